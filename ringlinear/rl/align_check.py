"""`ringlinear align-check`: how far the rollout engine's log-probs are from the training forward's.

N prompts of mixed lengths are sampled through the engine at temperature 1, all at once (continuous batching
mixes prefill pieces and decode steps), with their log-probs; `sequence_logprobs` recomputes them with the training
forward on packed rows. The four figures of `metrics.py` follow. When they are not all 0, the sample with the
largest difference is replayed alone through an eager engine and through the training forward with hooks on every
decoder layer, and the first (layer, op) whose output differs is named with the size of the difference: the
paper's layer-by-layer method (§5.2).
"""
from __future__ import annotations

import torch

from ..engine import EngineConfig, LLMEngine, SamplingParams
from .logprobs import sequence_logprobs
from .metrics import MISMATCH_KEYS, mismatch_metrics

OPS = ("input_layernorm", "attention", "post_attention_layernorm", "mlp")


def _prompts(n: int, vocab: int, max_len: int, seed: int) -> list[list[int]]:
    """n random prompts with lengths spread over 1..max_len (ids 3..: clear of the usual special ids)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.linspace(1, max_len, n).round().long().tolist()
    return [torch.randint(3, vocab, (int(L),), generator=g).tolist() for L in lens]


class _Recorder:
    """Forward hooks on every decoder layer's ops: outputs in call order, per (layer, op), concatenated over calls
    (the engine runs one request's tokens over several steps; packed order within a step is position order)."""

    def __init__(self, model):
        self.out: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            for op in OPS:
                self.handles.append(getattr(layer, op).register_forward_hook(self._hook(i, op)))
            self.handles.append(layer.register_forward_hook(self._hook(i, "output")))

    def _hook(self, i, op):
        def fn(module, args, output):
            self.out.setdefault((i, op), []).append(output.detach().float().cpu())
        return fn

    def close(self) -> dict[tuple[int, str], torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {k: torch.cat(v) for k, v in self.out.items()}


def first_divergence(model, prompt: list[int], numerics: str, max_tokens: int, seed: int) -> dict | None:
    """Replay one sample alone (eager engine, hooks on) and through the training forward; the first (layer, op) in
    execution order whose outputs differ at any position, with max |difference|. None if nothing differs."""
    eng = LLMEngine(model=model, config=EngineConfig(max_num_seqs=1, numerics=numerics, cuda_graphs=False,
                                                     num_kv_blocks=-(-(len(prompt) + max_tokens + 16) // 16) + 1,
                                                     device=str(next(model.parameters()).device)))
    rec = _Recorder(model)
    try:
        eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True))
        completion = []
        while eng.has_unfinished():
            for o in eng.step():
                completion = list(o.token_ids)
    finally:
        served = rec.close()
    rec = _Recorder(model)
    try:
        with torch.no_grad():
            sequence_logprobs(model, [prompt], [completion], numerics=numerics)
    finally:
        trained = rec.close()
    n = len(prompt) + len(completion) - 1  # positions both computed (the last token is only predicted)
    for i in range(len(model.model.layers)):
        for op in OPS + ("output",):
            a, b = served[(i, op)][:n], trained[(i, op)][:n]
            if not torch.equal(a, b):
                pos = int((a != b).flatten(1).any(1).nonzero()[0])
                return {"layer": i, "op": op, "max_abs_diff": float((a - b).abs().max()), "first_position": pos,
                        "layer_type": "softmax" if model.config.is_softmax_layer(i) else "linear"}
    return None


def align_check(model, numerics: str = "aligned", n_prompts: int = 16, max_tokens: int = 48, max_prompt: int = 300,
                seed: int = 0, engine_kwargs: dict | None = None) -> dict:
    """Sample, recompute, compare. Returns the four figures (MISMATCH_KEYS), tokens compared, and `divergence`
    (first_divergence of the worst sample, or None when everything agrees)."""
    prompts = _prompts(n_prompts, model.config.vocab_size, max_prompt, seed)
    kw = dict(max_num_seqs=n_prompts, numerics=numerics, device=str(next(model.parameters()).device),
              num_kv_blocks=n_prompts * (-(-(max_prompt + max_tokens + 16) // 16) + 1))
    kw.update(engine_kwargs or {})
    eng = LLMEngine(model=model, config=EngineConfig(**kw))
    rids = [eng.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i, logprobs=True,
                                              ignore_eos=True)) for i, p in enumerate(prompts)]
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    outs = [done[r] for r in rids]
    del eng
    with torch.no_grad():
        train = sequence_logprobs(model, prompts, [o.token_ids for o in outs], numerics=numerics)
    served = [torch.tensor(o.logprobs, dtype=torch.float32) for o in outs]
    res = mismatch_metrics(served, train)
    res["tokens"] = sum(len(s) for s in served)
    res["numerics"] = numerics
    res["divergence"] = None
    if any(res[k] for k in MISMATCH_KEYS):
        worst = max(range(len(outs)), key=lambda i: float((served[i] - train[i].cpu()).abs().max()))
        res["divergence"] = first_divergence(model, prompts[worst], numerics, max_tokens, seed + worst)
    return res
