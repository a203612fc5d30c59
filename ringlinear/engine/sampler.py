"""Picks each request's next token from its fp32 logits row, with the primitives `generate()` uses; and scores
prompt tokens for requests that ask for prompt log-probs.

Rows are handled one at a time (the request's own bias, penalties, grammar mask, log-softmax of a [1, V] row and
generator), so a request's token and log-probs never depend on the other rows of the step. The processing (bias,
penalties, mask) runs on the logits' device; what is reported as log-probs is always the unprocessed row's.
"""
from __future__ import annotations

import torch

from ..sampling import log_softmax_fp32, process_logits, sample, top_logprobs, top_logprobs_rows
from .sequence import Sequence

Sampled = tuple[int, float | None, list[tuple[int, float]] | None]


def sample_row(logits: torch.Tensor, seq: Sequence, processed: torch.Tensor | None = None) -> Sampled:
    """logits [V] fp32 -> (token id, its log-prob or None, top-k (id, log-prob) or None). `processed`: the row
    after bias / penalties / mask, drawn from; the log-probs are those of `logits`."""
    p = seq.params
    token = sample(logits if processed is None else processed, p, seq.generator)
    if not p.logprobs:
        return token, None, None
    lp = log_softmax_fp32(logits[None], _lp_temperature(p))[0]
    top = top_logprobs(lp, p.top_logprobs) if p.top_logprobs else None
    return token, float(lp[token]), top


def _lp_temperature(p) -> float:
    return p.temperature if p.tempered_logprobs and not p.greedy else 1.0


def process_rows(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [n, V] fp32 -> the rows to draw from: `logits` itself when no request processes its row, else a copy
    with each asking row's bias and penalties applied and the structured-output masks set, on the same device."""
    rows = [i for i, s in enumerate(seqs) if s.params.processes_logits]
    masked = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if not rows and not masked:
        return logits
    out = logits.clone()
    for i in rows:
        out[i] = process_logits(logits[i], seqs[i].params, seqs[i].history)
    if masked:
        from .structured import apply_masks
        apply_masks(out, masked, [seqs[i].matcher for i in masked])
    return out


def sample_rows(logits: torch.Tensor, seqs: list[Sequence], aligned: bool = False) -> list[Sampled]:
    """logits [n, V] fp32 (any device), one row per sequence. On a GPU this costs one device sync per step, not
    one per row: an all-greedy step without log-probs takes a batched argmax (exact, so it equals the per-row
    argmax, first index on ties), anything else copies the rows to the host once (twice when some rows are
    processed and log-probs are asked for: the processed rows and the raw ones).

    aligned: the sampled tokens' log-probs come from `ops.loss.token_logprobs` on the logits' own device, the
    function the trainer's `sequence_logprobs` uses in aligned mode (a fixed reduction order per row)."""
    dev_logits = logits
    drawn = process_rows(logits, seqs)
    if logits.device.type != "cpu":
        if all(s.params.greedy and not s.params.logprobs for s in seqs):
            return [(t, None, None) for t in torch.argmax(drawn, dim=-1).tolist()]
        processed = drawn is not dev_logits
        drawn = drawn.cpu()
        logits = dev_logits.cpu() if processed and any(s.params.logprobs for s in seqs) else drawn
    out = [sample_row(logits[i], s, drawn[i]) for i, s in enumerate(seqs)]
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


# ---------------------------------------------------------------------- prompt log-probs
def prompt_positions(seq: Sequence, start: int, num_tokens: int) -> tuple[int, int]:
    """Positions [lo, hi) of a piece (start, num_tokens) whose logits score a prompt token not yet scored: the
    logits at position j score prompt token j + 1. Empty (lo >= hi) for requests that did not ask, for decode
    steps and for a recomputed (preempted) prompt."""
    if seq.prompt_logprobs is None:
        return 0, 0
    return max(start, len(seq.prompt_logprobs) - 1), min(start + num_tokens, len(seq.prompt_token_ids) - 1)


def score_prompt(seq: Sequence, logits: torch.Tensor, aligned: bool = False) -> None:
    """logits [m, V] fp32 of the positions `prompt_positions` gave: append the log-probs of the m prompt tokens
    they predict (and their top-k) to the request. The same fp32 log-softmax (temperature rule, and in aligned mode
    the same `token_logprobs` kernel) as the sampled tokens."""
    p = seq.params
    first = len(seq.prompt_logprobs)
    targets = torch.tensor(seq.prompt_token_ids[first:first + logits.shape[0]], device=logits.device)
    temp = _lp_temperature(p)
    full = log_softmax_fp32(logits, temp) if p.prompt_logprobs or not aligned else None
    if aligned:
        from ..ops.loss import token_logprobs
        lp = token_logprobs(logits, targets, temp)[0]
    else:
        lp = full.gather(1, targets[:, None])[:, 0]
    seq.prompt_logprobs += lp.tolist()
    if p.prompt_logprobs:
        seq.prompt_top_logprobs += top_logprobs_rows(full, p.prompt_logprobs)
