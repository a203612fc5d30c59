"""Prefill steps replayed from CUDA graphs: steps whose every entry is a fresh prompt piece (position 0 on, at least
two tokens, no prompt log-probs), padded up to a token bucket.

Why: a prefill of a few thousand tokens is host-bound on an H200 (docs/serving.md, "Host pauses"): the 4K step of
the Ring-mini shape keeps the GPU busy ~25 ms of its 35-45 ms, the rest being ~300 Triton launches and their Python
wrappers. A replay costs one launch.

On by default (`EngineConfig.prefill_cuda_graphs`) since tests/engine/test_cuda.py passed on an H200 and a 1K
prefill of the Ring-mini shape went from 40.9 to 14.0 ms there (2026-12-01, BENCHMARKS.md). A graph per (T, S): T
tokens (a bucket: powers of two up to the step budget, at most MAX_GRAPH_TOKENS) and S piece slots (1, 2, 4, 8). It
sees static buffers: ids, positions and KV write rows [T], offsets [S + 2] and state slots [S + 1]. The live pieces
come first, unused piece slots have length 0, and the padding tokens form the last sequence, written to the scratch
slot and the scratch KV block. Every op of the prefill forward takes its offsets from the device, and the lightning
launch plan depends only on S and T (always segmented), so one graph serves every mix of lengths that fits. Each
piece attends only to its own tokens and starts from its own (zeroed) state slot, so the padding does not reach the
live rows.
16-bit or FP8 weights, default numerics, one GPU (model_runner.py logs why otherwise; engine.py for several
ranks). `StaticPrefillStep` also runs eagerly (tests check it on CPU against the eager path).
"""
from __future__ import annotations

import torch

from ..models.context import AttentionContext
from ..ops.attention import causal_attention_varlen
from ..ops.lightning_attn import lightning_attn_prefill
from .kv_cache import PagedKVCache
from .state_pool import StatePool


class _StaticPrefillContext(AttentionContext):
    """The first T rows of the static buffers, cut into S + 1 sequences (S piece slots, then the padding). Holds
    the buffers, not the step: no reference cycle, so dropped graphs free their memory pool at once (sleep())."""

    def __init__(self, step: "StaticPrefillStep", T: int, S: int):
        self.T, self.kv, self.states = T, step.kv, step.states
        self.positions, self.rows = step.positions[:T], step.write_rows[:T]
        self.cu_seqlens, self.slots = step.cu[S], step.slots[S]
        self.plans: dict = {}  # the lightning launch plan of this (T, S), built by the first linear layer

    def linear_attention(self, layer_idx, q, k, v, g_gamma, scale):  # q, k, v [T, H, D]
        # segmented: the plan cannot see how long the live pieces are (the padding and empty slots count as
        # sequences), so it always cuts them into segments; a long prompt or padding never runs as one program
        o = lightning_attn_prefill(q[None], k[None], v[None], g_gamma, self.states.states[layer_idx], self.slots,
                                   self.cu_seqlens, scale=scale, plans=self.plans, segmented=True)
        return o[0]

    def softmax_attention(self, layer_idx, q, k, v, scale):  # q [T, H, D], k, v [T, KV, D]
        K, V = self.kv.flat(layer_idx)
        rows = self.rows
        K.index_copy_(0, rows, k)
        V.index_copy_(0, rows, v)
        return causal_attention_varlen(q, k, v, self.cu_seqlens, scale, max_seqlen=self.T)


class StaticPrefillStep:
    """Static buffers plus the prefill forward over the first T of them, for up to S pieces: -> logits [S, V] fp32
    of each piece's last row (rows past the live count are garbage).

    The sequence count is part of the graph (S in `seq_slots`), not padded to the largest: the lightning launch
    plan splits long sequences into segments only when there are few sequences, which is what a single long
    prompt needs (with 65 sequences, one 4K prompt would run as 32 sequential programs)."""

    def __init__(self, model, kv: PagedKVCache, states: StatePool, max_tokens: int, seq_slots: list[int], device):
        self.model, self.kv, self.states, self.device = model, kv, states, device
        self.seq_slots = sorted(seq_slots)
        z = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(max_tokens, **z)
        self.positions = torch.zeros(max_tokens, **z)
        self.write_rows = torch.full((max_tokens,), kv.scratch_block * kv.block_size, **z)
        i32 = dict(dtype=torch.int32, device=device)
        self.cu = {S: torch.zeros(S + 2, **i32) for S in self.seq_slots}  # S pieces, then the padding sequence
        self.slots = {S: torch.full((S + 1,), states.scratch_slot, **i32) for S in self.seq_slots}
        self.last_rows = {S: torch.zeros(S, **z) for S in self.seq_slots}
        self._ctx: dict[tuple[int, int], _StaticPrefillContext] = {}

    def load(self, entries, T: int, S: int) -> int:
        """Fill the buffers from fresh prefill pieces, padded to T tokens and S pieces; returns the live count."""
        n = len(entries)
        bs = self.kv.block_size
        ids, pos, rows, cu, slots, last = [], [], [], [0], [], []
        for s in entries:
            seq, L = s.seq, s.num_tokens
            ids += seq.token_slice(0, L)
            pos += range(L)
            rows.append(self.kv.token_rows(seq.block_table, 0, L))
            cu.append(cu[-1] + L)
            slots.append(seq.slot)
            last.append(cu[-1] - 1)
        used = cu[-1]
        pad = T - used
        scratch = self.kv.scratch_block * bs
        self.ids[:T].copy_(torch.tensor(ids + [0] * pad))
        self.positions[:T].copy_(torch.tensor(pos + list(range(pad))))
        self.write_rows[:T].copy_(torch.cat(rows + [scratch + torch.arange(pad) % bs]))
        # pieces past the live ones have length 0; the padding sequence runs from the last live row to T
        self.cu[S].copy_(torch.tensor(cu + [used] * (S - n) + [T], dtype=torch.int32))
        self.slots[S].copy_(torch.tensor(slots + [self.states.scratch_slot] * (S + 1 - n), dtype=torch.int32))
        self.last_rows[S].copy_(torch.tensor(last + [0] * (S - n)))
        return n

    def contexts(self):
        return self._ctx.values()

    def shape_for(self, entries, buckets: list[int]) -> tuple[int, int]:
        """The smallest (T in buckets, S in seq_slots) that holds these pieces."""
        total = sum(s.num_tokens for s in entries)
        return (next(b for b in buckets if b >= total), next(x for x in self.seq_slots if x >= len(entries)))

    def forward(self, T: int, S: int) -> torch.Tensor:
        ctx = self._ctx.get((T, S))
        if ctx is None:
            ctx = self._ctx[(T, S)] = _StaticPrefillContext(self, T, S)
        # The lightning plan's segment table is built from the offsets on the device: rebuilt inside every forward
        # so a captured graph rebuilds it from the offsets of each replay, never reusing the warm-up's.
        ctx.plans = {}
        hidden = self.model.forward_packed(self.ids[:T], ctx)
        return self.model.compute_logits(hidden[self.last_rows[S]])


# Largest step replayed from a graph. The host's launch work (~25 ms a step on an H200 host) runs ahead of the
# kernels: it is most of a 1K step (40.9 ms eager, 14.0 ms replayed) but hides behind a 4K step's ~25 ms of kernels
# (30.7 vs 28.2 ms); past 8K a graph's memory pool would buy almost nothing.
MAX_GRAPH_TOKENS = 8192


def prefill_buckets(max_tokens: int, smallest: int = 256) -> list[int]:
    """Token buckets: powers of two from `smallest` up to the step budget (the budget itself last)."""
    max_tokens = min(max_tokens, MAX_GRAPH_TOKENS)
    sizes, t = [], smallest
    while t < max_tokens:
        sizes.append(t)
        t *= 2
    return sizes + [max_tokens]


class PrefillGraphs:
    """One captured graph per (token bucket, piece slots); `run` pads the step up to the next of each."""

    def __init__(self, step: StaticPrefillStep, buckets: list[int], capture: bool = True):
        self.step = step
        self.buckets = sorted(buckets)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.capture = capture  # False: the same static buffers and padding, run eagerly (CPU tests, debugging)
        if not capture:
            return
        pool = None
        stream = torch.cuda.Stream()  # one side stream: the warm-ups' cached blocks stay reusable by each other
        for T in reversed(self.buckets):  # largest first so smaller graphs reuse its memory pool
            for S in reversed(step.seq_slots):
                step.load([], T, S)  # every row padding: warm-up and capture touch only scratch memory
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up outside capture (lazy inits, Triton compiles and autotuning)
                        step.forward(T, S)
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.outputs[(T, S)] = step.forward(T, S)
                pool = g.pool()
                self.graphs[(T, S)] = g
        torch.cuda.synchronize()
        for ctx in step.contexts():  # the captured plans live in the graphs now; the Python objects are not needed
            ctx.plans = {}
        torch.cuda.empty_cache()

    def fits(self, entries) -> bool:
        return len(entries) <= self.step.seq_slots[-1] and sum(s.num_tokens for s in entries) <= self.buckets[-1]

    def run(self, entries) -> torch.Tensor:
        """-> logits [len(entries), V] fp32 of each piece's last row."""
        T, S = self.step.shape_for(entries, self.buckets)
        n = self.step.load(entries, T, S)
        if not self.capture:
            return self.step.forward(T, S)[:n]
        self.graphs[(T, S)].replay()
        return self.outputs[(T, S)][:n]
