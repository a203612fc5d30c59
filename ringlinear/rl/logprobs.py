"""Log-probs of completion tokens under the TRAINING forward: the trainer's side of every RL ratio.

The rows are packed like a training micro-batch (prompt + completion of each sample end to end, `cu_seqlens`
marking the samples; the linear state, softmax window and RoPE positions restart at each one) and run through
`model.model.forward_packed` with a `StatelessContext`, the same path `model(ids[None], cu_seqlens=...)` takes.
The LM head runs only on the rows that predict a completion token (no [T, V] logits for prompt positions), in
chunks of `HEAD_CHUNK` rows; with grad enabled each chunk is checkpointed, so at most one [chunk, V] block of fp32
logits is alive in the forward and in the backward.

Numerics modes (`numerics=`):
- "default": the fast training kernels. The engine decodes with the recurrent lightning form and paged attention,
  so its log-probs differ from these in the last bits (align-check measures by how much).
- "aligned": the forward runs as `RingLinearForCausalLM` runs it in aligned mode (batch-invariant linears, the
  chunk-aligned lightning attention and the fixed key-order softmax attention) and the log-probs come from
  `ops.loss.token_logprobs`: what the engine computes with EngineConfig(numerics="aligned"), bit for bit
  (docs/numerics.md).
"""
from __future__ import annotations

import contextlib

import torch

from ..models.context import StatelessContext, check_numerics
from ..ops.linear import invariant_mode
from ..ops.loss import token_logprobs
from ..sampling import log_softmax_fp32

HEAD_CHUNK = 1024  # rows per LM-head block; a multiple of the engine's row_block (16) so rows stay block-aligned


def pack_completions(prompts: list[list[int]], completions: list[list[int]], vocab_size: int,
                     device: torch.device) -> dict:
    """-> ids [T], cu_seqlens [N+1] int32, rows [M] (packed position predicting each completion token), targets [M],
    lens (completion lengths, M = sum). Each sample is prompt + completion[:-1]: the last completion token is only
    a target. Validation errors name the sample."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    ids, rows, targets, cu, lens = [], [], [], [0], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p, c = [int(t) for t in p], [int(t) for t in c]
        if not p:
            raise ValueError(f"prompt {i} is empty (the first completion token needs a position to be predicted from)")
        if not c:
            raise ValueError(f"completion {i} is empty")
        bad = [t for t in p + c if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sample {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        start = cu[-1]
        ids += p + c[:-1]
        rows += range(start + len(p) - 1, start + len(p) - 1 + len(c))
        targets += c
        cu.append(len(ids))
        lens.append(len(c))
    kw = dict(dtype=torch.long, device=device)
    return {"ids": torch.tensor(ids, **kw), "cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=device),
            "rows": torch.tensor(rows, **kw), "targets": torch.tensor(targets, **kw), "lens": lens,
            "max_len": max(b - a for a, b in zip(cu[:-1], cu[1:]))}


def _head(model, h: torch.Tensor, targets: torch.Tensor, temperature: float, aligned: bool):
    """h [m, hidden], targets [m] -> (log-prob [m] fp32, entropy [m] fp32 detached) of the tempered softmax.
    The invariant mode is entered here, not around the checkpoint, so a recompute in backward runs it too."""
    with invariant_mode(h.device) if aligned else contextlib.nullcontext():
        logits = model.compute_logits(h)  # [m, V]
    lp, _ = token_logprobs(logits, targets, temperature)
    with torch.no_grad():
        full = log_softmax_fp32(logits, temperature)
        ent = -(full.exp() * full).sum(-1)
    return lp, ent


def completion_token_stats(model, prompts, completions, numerics: str = "default", temperature: float = 1.0):
    """-> (log-probs [M] fp32, entropies [M] fp32 (no grad), lens): every completion token of every sample, flat.

    Differentiable w.r.t. the model's parameters when grad is enabled; works under no_grad / inference_mode."""
    check_numerics(numerics)
    if not temperature or temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the distribution log-probs are taken of), got {temperature}")
    device = next(model.parameters()).device
    pk = pack_completions(prompts, completions, model.config.vocab_size, device)
    T = int(pk["ids"].shape[0])
    mode = invariant_mode(device) if numerics == "aligned" else contextlib.nullcontext()
    with mode:
        ctx = StatelessContext(pk["cu_seqlens"], total=T, max_seqlen=pk["max_len"], numerics=numerics)
        hidden = model.model.forward_packed(pk["ids"], ctx)  # [T, hidden]
        h = hidden[pk["rows"]]  # [M, hidden]
        lps, ents = [], []
        for s in range(0, h.shape[0], HEAD_CHUNK):
            hc, tc = h[s:s + HEAD_CHUNK], pk["targets"][s:s + HEAD_CHUNK]
            if torch.is_grad_enabled() and hc.requires_grad:
                from torch.utils.checkpoint import checkpoint
                lp, ent = checkpoint(_head, model, hc, tc, temperature, numerics == "aligned", use_reentrant=False)
            else:
                lp, ent = _head(model, hc, tc, temperature, numerics == "aligned")
            lps.append(lp)
            ents.append(ent)
    return torch.cat(lps), torch.cat(ents), pk["lens"]


def sequence_logprobs(model, prompts: list[list[int]], completions: list[list[int]], numerics: str = "default",
                      temperature: float = 1.0) -> list[torch.Tensor]:
    """fp32 log-prob of every completion token given its prompt and the completion before it, one [len] tensor per
    sample, from the training forward on packed rows. `temperature`: log-probs of softmax(logits / temperature),
    the distribution a token sampled at that temperature came from (1 = the model's own). Differentiable; also
    under torch.no_grad(). Errors: numerics not "default"/"aligned", an empty prompt or completion, token ids
    outside the vocabulary."""
    lp, _, lens = completion_token_stats(model, prompts, completions, numerics, temperature)
    return list(lp.split(lens))
