"""Picks each request's next token from its fp32 logits row, with the primitives `generate()` uses; and scores
prompt tokens for requests that ask for prompt log-probs.

Each row gets its request's own bias, penalties, grammar mask, filters and generator, and every op works row by row
(on the CPU one row at a time, on a GPU batched on the device), so a request's token and log-probs never depend on
the other rows of the step. The processing (bias, penalties, mask) runs on the logits' device; what is reported as
log-probs is always the unprocessed row's.
"""
from __future__ import annotations

import torch

from ..sampling import (log_softmax_fp32, process_logits, sample, sample_batch, top_logprobs,
                        top_logprobs_rows)
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
    """logits [n, V] fp32 (any device), one row per sequence. On the CPU each row goes through `sample_row`; on a
    GPU the whole step is one batched draw on the device (`sample_sequences`) and one copy of its results.

    aligned: the sampled tokens' log-probs come from `ops.loss.token_logprobs` on the logits' own device, the
    function the trainer's `sequence_logprobs` uses in aligned mode (a fixed reduction order per row)."""
    drawn = process_rows(logits, seqs)
    if logits.device.type != "cpu":
        return sample_sequences(logits, drawn, seqs, aligned)
    out = [sample_row(logits[i], s, drawn[i]) for i, s in enumerate(seqs)]
    if aligned and any(s.params.logprobs for s in seqs):
        from ..ops.loss import token_logprobs
        for temp, rows in by_temperature(seqs).items():
            lp, _ = token_logprobs(logits[rows], torch.tensor([out[i][0] for i in rows]), temp)
            for i, v in zip(rows, lp.tolist()):
                out[i] = (out[i][0], v, out[i][2])
    return out


def sample_sequences(logits: torch.Tensor, drawn: torch.Tensor, seqs: list[Sequence], aligned: bool) -> list[Sampled]:
    """The device path of `sample_rows`: logits [n, V] (raw, for log-probs) and drawn [n, V] (processed, drawn
    from) on a GPU. Tokens from `sample_batch`; log-probs by fp32 log-softmax (or `token_logprobs` in aligned mode)
    of the rows that ask, grouped by temperature; host syncs: one for the tokens, one per group for log-probs,
    one per top-k group. Row by row ops throughout, so a row's results do not depend on its neighbours."""
    tokens = sample_batch(drawn, [s.params for s in seqs], [s.generator for s in seqs])
    lps: dict[int, float] = {}
    tops: dict[int, list] = {}
    for temp, rows in by_temperature(seqs).items():
        k_rows = [j for j, i in enumerate(rows) if seqs[i].params.top_logprobs]
        lp, full = group_logprobs(logits, tokens, torch.tensor(rows, device=logits.device), temp, aligned,
                                  full=bool(k_rows))
        lps.update(zip(rows, lp.tolist()))
        for k in {seqs[rows[j]].params.top_logprobs for j in k_rows}:
            sel = [j for j in k_rows if seqs[rows[j]].params.top_logprobs == k]
            tops.update(zip([rows[j] for j in sel], top_logprobs_rows(full[sel], k)))
    return [(t, lps.get(i), tops.get(i)) for i, t in enumerate(tokens.tolist())]


def group_logprobs(logits: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor, temp: float, aligned: bool,
                   full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-probs [m] fp32 (on the logits' device, nothing read back) of tokens [n] under logits [n, V] at
    `temp`, for the rows idx [m] (int64, on the logits' device); and, when `full` or not aligned, those rows' whole
    fp32 log-softmax (for top-k). Aligned: `token_logprobs`, the trainer's kernel."""
    raw, tok = logits.index_select(0, idx), tokens.index_select(0, idx)
    whole = log_softmax_fp32(raw, temp) if full or not aligned else None
    if aligned:
        from ..ops.loss import token_logprobs
        return token_logprobs(raw, tok, temp)[0], whole
    return whole.gather(1, tok[:, None])[:, 0], whole


def by_temperature(seqs: list[Sequence]) -> dict[float, list[int]]:
    """The rows asking for log-probs, grouped by the temperature their log-probs are taken at."""
    groups: dict[float, list[int]] = {}
    for i, s in enumerate(seqs):
        if s.params.logprobs:
            groups.setdefault(_lp_temperature(s.params), []).append(i)
    return groups


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
