"""`generate()`: batched prefill then token-by-token decode over a HybridCache (the simple, readable path).

The serving engine (`ringlinear.engine`) does the same with continuous batching; both use `ringlinear.sampling`,
so greedy outputs agree token for token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import (Sampling, TokenHistory, log_softmax_fp32, make_generator, process_logits, sample,
                       sample_batch)


@dataclass
class GenerationOutput:
    sequences: list[list[int]]            # generated ids per row (prompt excluded; stop token included)
    logprobs: list[list[float]] = field(default_factory=list)  # log-prob of each generated token (fp32 logits)
    finish_reasons: list[str] = field(default_factory=list)    # "stop" or "length"


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_token_ids=None, attention_mask=None,
             streamer=None, sampling: Sampling | None = None) -> GenerationOutput:
    """input_ids: [B, T] tensor (padding marked by attention_mask, left or right) or a list of id lists.

    `sampling` (a `Sampling`, built and checked by the caller) replaces max_new_tokens, temperature, top_k, top_p
    and seed, and is the way to ask for min_p, penalties and logit_bias (applied as the serving engine applies
    them: `ringlinear.sampling`). Row i samples with a generator seeded `seed + i`. `streamer(row, token_id)` is
    called for every new token. Log-probs are those of the raw logits.
    """
    if sampling is None:
        sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    sampling.check_vocab(model.config.vocab_size)
    max_new_tokens, seed = sampling.max_tokens, sampling.seed
    device = next(model.parameters()).device
    if isinstance(input_ids, (list, tuple)):
        rows = [list(map(int, r)) for r in input_ids]
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            attention_mask[i, :len(r)] = 1
        input_ids = ids
    input_ids = input_ids.to(device)
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if bool((attention_mask.sum(1) == 0).any()):
        raise ValueError("every prompt needs at least one token")
    stop = set(int(s) for s in (stop_token_ids if stop_token_ids is not None else model.config.stop_token_ids))
    gens = [make_generator(None if seed is None else seed + i) for i in range(B)]
    was_training = model.training
    model.eval()

    out = model(input_ids, attention_mask=attention_mask, use_cache=True)
    cache = out.cache
    # The last real token of each row (works for left and right padding).
    last = attention_mask.long().cumsum(1).argmax(1)
    logits = out.logits[torch.arange(B, device=device), last]  # [B, V] fp32
    seqs = [[] for _ in range(B)]
    lps = [[] for _ in range(B)]
    history = [TokenHistory(input_ids[i][attention_mask[i].bool()].tolist(), seqs[i]) for i in range(B)] \
        if sampling.processes_logits else [None] * B
    reasons = ["length"] * B
    done = [False] * B
    for step in range(max_new_tokens):
        lp = log_softmax_fp32(logits)
        nxt = torch.zeros(B, 1, dtype=torch.long)
        live = [i for i in range(B) if not done[i]]
        rows = [process_logits(logits[i], sampling, history[i]) if sampling.processes_logits else logits[i]
                for i in live]
        if device.type == "cpu":
            toks = [sample(row, sampling, gens[i]) for row, i in zip(rows, live)]
        else:  # the serving engine's GPU draw: no host sort of each row, one copy of the tokens
            toks = sample_batch(torch.stack(rows), [sampling] * len(live), [gens[i] for i in live]).tolist()
        tok_lps = lp[live, toks].tolist()
        for i, t, t_lp in zip(live, toks, tok_lps):
            seqs[i].append(t)
            lps[i].append(t_lp)
            nxt[i, 0] = t
            if streamer is not None:
                streamer(i, t)
            if t in stop:
                done[i], reasons[i] = True, "stop"
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.tensor([[0 if d else 1] for d in done], dtype=torch.long, device=device)
        logits = model(nxt.to(device), attention_mask=mask, cache=cache).logits[:, -1]
    model.train(was_training)
    return GenerationOutput(seqs, lps, reasons)
