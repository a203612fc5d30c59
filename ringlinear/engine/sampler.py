"""Picks each request's next token from its fp32 logits row, with the primitives `generate()` uses.

Rows are handled one at a time (log-softmax of a [1, V] row, the request's own generator), so a request's token
and log-probs never depend on the other rows of the step.
"""
from __future__ import annotations

import torch

from ..sampling import log_softmax_fp32, sample, top_logprobs
from .sequence import Sequence

Sampled = tuple[int, float | None, list[tuple[int, float]] | None]


def sample_row(logits: torch.Tensor, seq: Sequence) -> Sampled:
    """logits [V] fp32 -> (token id, its log-prob or None, top-k (id, log-prob) or None)."""
    p = seq.params
    token = sample(logits, p, seq.generator)
    if not p.logprobs:
        return token, None, None
    lp = log_softmax_fp32(logits[None])[0]
    top = top_logprobs(lp, p.top_logprobs) if p.top_logprobs else None
    return token, float(lp[token]), top


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[Sampled]:
    """logits [n, V] fp32 (any device), one row per sequence. On a GPU this costs one device sync per step, not
    one per row: an all-greedy step without log-probs takes a batched argmax (exact, so it equals the per-row
    argmax, first index on ties), anything else copies the rows to the host once."""
    if logits.device.type != "cpu":
        if all(s.params.greedy and not s.params.logprobs for s in seqs):
            return [(t, None, None) for t in torch.argmax(logits, dim=-1).tolist()]
        logits = logits.cpu()
    return [sample_row(logits[i], s) for i, s in enumerate(seqs)]
