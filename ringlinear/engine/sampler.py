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
    lp = log_softmax_fp32(logits[None], _lp_temperature(p))[0]
    top = top_logprobs(lp, p.top_logprobs) if p.top_logprobs else None
    return token, float(lp[token]), top


def _lp_temperature(p) -> float:
    return p.temperature if p.tempered_logprobs and not p.greedy else 1.0


def sample_rows(logits: torch.Tensor, seqs: list[Sequence], aligned: bool = False) -> list[Sampled]:
    """logits [n, V] fp32 (any device), one row per sequence. On a GPU this costs one device sync per step, not
    one per row: an all-greedy step without log-probs takes a batched argmax (exact, so it equals the per-row
    argmax, first index on ties), anything else copies the rows to the host once.

    aligned: the sampled tokens' log-probs come from `ops.loss.token_logprobs` on the logits' own device, the
    function the trainer's `sequence_logprobs` uses in aligned mode (a fixed reduction order per row)."""
    dev_logits = logits
    if logits.device.type != "cpu":
        if all(s.params.greedy and not s.params.logprobs for s in seqs):
            return [(t, None, None) for t in torch.argmax(logits, dim=-1).tolist()]
        logits = logits.cpu()
    out = [sample_row(logits[i], s) for i, s in enumerate(seqs)]
    if aligned and any(s.params.logprobs for s in seqs):
        from ..ops.loss import token_logprobs
        by_temp: dict[float, list[int]] = {}
        for i, s in enumerate(seqs):
            if s.params.logprobs:
                by_temp.setdefault(_lp_temperature(s.params), []).append(i)
        for temp, rows in by_temp.items():
            toks = torch.tensor([out[i][0] for i in rows], device=dev_logits.device)
            idx = torch.tensor(rows, device=dev_logits.device)
            lp, _ = token_logprobs(dev_logits.index_select(0, idx), toks, temp)
            for i, v in zip(rows, lp.tolist()):
                out[i] = (out[i][0], v, out[i][2])
    return out
