"""Rollouts: the serving engine sampling from the policy's own weights (the same tensors the optimizer updates).

The engine is built once with `LLMEngine(model=policy, ...)`: no copy, no weight sync. Between rollouts it
sleeps (KV cache, state slots and CUDA graphs freed, so the training phase has the memory); `wake()` re-creates
them and recaptures the graphs against the weights as they are. With `keep_engine_cache` it stays awake and its
graphs stay valid because the optimizer updates every parameter in place (`check_in_place` verifies that).

GRPO's G samples of a prompt are one engine group (`LLMEngine.add_group`) with seeds derived from (run seed, step,
prompt, sample): the prompt is prefilled once and the other G - 1 samples fork from it, each equal to the same
request run alone. The prefix cache is reset at every rollout: what it holds was computed by earlier weights
(sleep() resets it anyway; with `keep_cache` the engine stays awake across the optimizer step).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from ..engine import EngineConfig, LLMEngine, SamplingParams

PROMPT_ALLOWANCE = 1024  # KV tokens reserved per request beyond max_new_tokens (prompts are preempted past it)


def sample_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """A 63-bit seed that depends only on its four arguments."""
    h = hashlib.sha256(f"ringlinear-rl-sample:{seed}:{step}:{prompt}:{sample}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


@dataclass
class RolloutBatch:
    """N = prompts x G samples, grouped: sample k belongs to prompt group[k]."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]   # stop token included when the sample stopped on one
    logprobs: list[torch.Tensor]      # [len] fp32: the engine's log-probs of the tempered distribution
    texts: list[str]                  # decoded completion, stop strings cut
    finish_reasons: list[str]
    group: list[int]
    seconds: float                    # all of it, wake() and sleep() included
    memory_seconds: float = 0.0       # of which wake() + sleep(): caches re-created, CUDA graphs recaptured

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class Rollout:
    def __init__(self, policy, tokenizer, max_num_seqs: int, max_new_tokens: int, keep_cache: bool = False,
                 numerics: str = "default"):
        device = next(policy.parameters()).device
        bs = 16
        blocks = max_num_seqs * -(-(max_new_tokens + PROMPT_ALLOWANCE) // bs)
        # No prefill graphs: wake() would recapture them every RL step (12 graphs at the default budget), and
        # a rollout replays one at most on its first step (fresh pieces only, at most 8 of them).
        cfg = EngineConfig(max_num_seqs=max_num_seqs, device=str(device), num_kv_blocks=blocks, block_size=bs,
                           numerics=numerics, prefill_cuda_graphs=False)
        self.engine = LLMEngine(config=cfg, model=policy, tokenizer=tokenizer)
        self.keep_cache = keep_cache
        if not keep_cache:
            self.engine.sleep()

    def generate(self, prompt_ids: list[list[int]], group_size: int, seeds: list[list[int]], *, temperature: float,
                 top_p: float, max_new_tokens: int, stop: tuple[str, ...] = (), ignore_eos: bool = False
                 ) -> RolloutBatch:
        """Sample group_size completions of every prompt (seeds[i][g] for sample g of prompt i)."""
        eng = self.engine
        was_training = eng.model.training
        eng.model.eval()  # before wake(): graph capture must see the inference forward (no activation checkpoints)
        t0 = time.perf_counter()
        eng.wake()
        eng.reset_prefix_cache()
        t_mem = time.perf_counter() - t0
        rids, owner = [], []
        try:
            for i, ids in enumerate(prompt_ids):
                params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         seed=seeds[i][g], stop=list(stop), ignore_eos=ignore_eos, logprobs=True,
                                         tempered_logprobs=True) for g in range(group_size)]
                rids += eng.add_group(ids, params)
                owner += [i] * group_size
            done = {}
            while len(done) < len(rids):
                for out in eng.step():
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for r in rids:
                if r in eng.seqs:
                    eng.abort_request(r)
            eng.model.train(was_training)
        t1 = time.perf_counter()
        if not self.keep_cache:
            eng.sleep()
        t_end = time.perf_counter()
        outs = [done[r] for r in rids]
        return RolloutBatch([list(prompt_ids[i]) for i in owner], [list(o.token_ids) for o in outs],
                            [torch.tensor(o.logprobs, dtype=torch.float32) for o in outs], [o.text for o in outs],
                            [o.finish_reason for o in outs], owner, t_end - t0, t_mem + t_end - t1)


def param_pointers(model) -> dict[str, int]:
    """Storage address of every parameter and buffer, plus the stacked MoE weights the fused kernels read."""
    ptrs = {n: t.data_ptr() for n, t in model.named_parameters()}
    ptrs.update({n: t.data_ptr() for n, t in model.named_buffers()})
    for n, m in model.named_modules():
        if hasattr(m, "w13"):
            ptrs[n + ".w13"], ptrs[n + ".w2"] = m.w13.data_ptr(), m.w2.data_ptr()
    return ptrs


def check_in_place(model, before: dict[str, int]) -> None:
    """Raise if any tensor the engine reads moved (an optimizer that rebinds .data would stale the CUDA graphs and
    leave the MoE stacks behind the expert Parameters)."""
    now = param_pointers(model)
    moved = [n for n, p in before.items() if now.get(n) != p]
    if moved:
        raise RuntimeError(f"the optimizer step moved {len(moved)} tensor(s) the engine reads (first: {moved[0]}); "
                           "RL needs in-place updates")
