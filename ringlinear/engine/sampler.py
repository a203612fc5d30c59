"""Picks each request's next token from its fp32 logits row, with the primitives `generate()` uses.

Rows are handled one at a time (log-softmax of a [1, V] row, the request's own generator), so a request's token
and log-probs never depend on the other rows of the step.
"""
from __future__ import annotations

import torch

from ..sampling import log_softmax_fp32, sample, top_logprobs
from .sequence import Sequence


def sample_row(logits: torch.Tensor, seq: Sequence) -> tuple[int, float | None, list[tuple[int, float]] | None]:
    """logits [V] fp32 -> (token id, its log-prob or None, top-k (id, log-prob) or None)."""
    p = seq.params
    token = sample(logits, p.temperature, p.top_k, p.top_p, seq.generator)
    if not p.logprobs:
        return token, None, None
    lp = log_softmax_fp32(logits[None])[0]
    top = top_logprobs(lp, p.top_logprobs) if p.top_logprobs else None
    return token, float(lp[token]), top
