"""Decode steps replayed from CUDA graphs (one graph per padded batch size).

On by default; `EngineConfig.cuda_graphs = False` (`ringlinear serve --enforce-eager`) turns it off. It has run on
an H100 in the long-context benchmark (benchmarks/long_context.py; BENCHMARKS.md, 2026-11-26). Capture needs every op of
the decode step to be free of host syncs (the CUDA kernels are written that way; the CPU reference MoE's
`bincount().tolist()` is not); if capture fails anyway, the runner logs a warning and runs eagerly.

A graph sees static tensors only: token ids, positions, slot ids, flat KV write rows, block tables padded to
`max_blocks` and context lengths, all [B_graph, ...]. The paged decode attention kernel's grid depends only on the
table width, so one graph serves every context length up to max_model_len. Rows beyond the live batch point at the
scratch slot and scratch block, so they compute garbage that nobody reads. `StaticDecodeStep` also runs eagerly
(tests check it on CPU against the paged context).
"""
from __future__ import annotations

import logging

import torch

from ..models.context import AttentionContext
from .context import PagedDecode
from .kv_cache import PagedKVCache
from .state_pool import StatePool

log = logging.getLogger(__name__)


class _StaticContext(AttentionContext):
    """The first B rows of the static buffers as an attention context (decode only)."""

    def __init__(self, step: "StaticDecodeStep", B: int):
        self.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=step.device)
        self.positions = step.positions[:B]
        self.decode = PagedDecode(step.kv, step.states, step.slot_ids[:B], step.write_rows[:B],
                                  step.block_tables[:B], step.context_lens[:B], positions=self.positions,
                                  aligned=step.aligned)

    def linear_attention(self, layer_idx, q, k, v, g_gamma, scale):
        return self.decode.linear(layer_idx, q, k, v, g_gamma, scale)

    def softmax_attention(self, layer_idx, q, k, v, scale):
        return self.decode.softmax(layer_idx, q, k, v, scale)


class StaticDecodeStep:
    """Static buffers plus the decode forward over the first B of them: (ids, ...) -> logits [B, V] fp32."""

    def __init__(self, model, kv: PagedKVCache, states: StatePool, max_batch: int, max_blocks: int, device,
                 aligned: bool = False):
        self.model, self.kv, self.states, self.device = model, kv, states, device
        self.aligned = aligned
        self.max_batch, self.max_blocks = max_batch, max_blocks
        z = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(max_batch, **z)
        self.positions = torch.zeros(max_batch, **z)
        self.slot_ids = torch.full((max_batch,), states.scratch_slot, **z)
        self.write_rows = torch.full((max_batch,), kv.scratch_block * kv.block_size, **z)
        self.block_tables = torch.full((max_batch, max_blocks), kv.scratch_block, **z)
        self.context_lens = torch.ones(max_batch, **z)
        # Host mirror of block_tables and what each row holds: (request id, preemption count, blocks written).
        # A running request's table only grows, and a preemption bumps its count, so a row whose key matches
        # needs only its new tail written. Rebuilding every row every step cost O(batch x context) host work.
        self._host_table = torch.full((max_batch, max_blocks), kv.scratch_block, dtype=torch.long)
        self._row_key: list[tuple | None] = [None] * max_batch

    def _load_table_row(self, i: int, seq) -> bool:
        """Bring row i of the block table up to date for `seq`; True when the row changed."""
        bt = seq.block_table
        key = self._row_key[i]
        if key is not None and key[0] == seq.request_id and key[1] == seq.num_preemptions and key[2] <= len(bt):
            if key[2] == len(bt):
                return False
            self._host_table[i, key[2]:len(bt)] = torch.tensor(bt[key[2]:], dtype=torch.long)
        else:
            self._host_table[i].fill_(self.kv.scratch_block)
            self._host_table[i, :len(bt)] = torch.tensor(bt, dtype=torch.long)
        self._row_key[i] = (seq.request_id, seq.num_preemptions, len(bt))
        return True

    def load(self, seqs, ids: torch.Tensor | None = None) -> int:
        """Fill the buffers from scheduled decode entries (input tokens from `ids` [n] when given, else each
        sequence's own); returns the live batch size."""
        n = len(seqs)
        bs = self.kv.block_size
        tokens, pos, slots, rows, lens = [], [], [], [], []
        changed = []
        for i, s in enumerate(seqs):
            seq, p = s.seq, s.start
            if ids is None:
                tokens += seq.token_slice(p, p + 1)
            pos.append(p)
            slots.append(seq.slot)
            rows.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            if self._load_table_row(i, seq):
                changed.append(i)
        for i in range(n, self.max_batch):  # padding rows: the scratch block (their outputs are never read)
            if self._row_key[i] is not None:
                self._host_table[i].fill_(self.kv.scratch_block)
                self._row_key[i] = None
                changed.append(i)
        pad = self.max_batch - n
        if ids is None:
            self.ids.copy_(torch.tensor(tokens + [0] * pad))
        else:  # the padding rows keep earlier (valid) ids
            self.ids[:n].copy_(ids, non_blocking=True)
        self.positions.copy_(torch.tensor(pos + [0] * pad))
        self.slot_ids.copy_(torch.tensor(slots + [self.states.scratch_slot] * pad))
        self.write_rows.copy_(torch.tensor(rows + [self.kv.scratch_block * bs] * pad))
        self.context_lens.copy_(torch.tensor(lens + [1] * pad))
        if len(changed) > self.max_batch // 4:
            self.block_tables.copy_(self._host_table)
        elif changed:
            idx = torch.tensor(changed)
            self.block_tables.index_copy_(0, idx.to(self.block_tables.device), self._host_table[idx].to(
                self.block_tables.device))
        return n

    def forward(self, B: int) -> torch.Tensor:
        hidden = self.model.forward_packed(self.ids[:B], _StaticContext(self, B))
        return self.model.compute_logits(hidden)


class DecodeGraphs:
    """One captured graph per batch size in `sizes`; `run` pads the live batch up to the next size."""

    def __init__(self, step: StaticDecodeStep, sizes: list[int]):
        self.step = step
        self.sizes = sorted(sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        for B in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside capture (lazy inits, Triton autotune)
                    step.forward(B)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[B] = step.forward(B)
            pool = g.pool()
            self.graphs[B] = g
        torch.cuda.synchronize()

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    def run(self, seqs, ids: torch.Tensor | None = None) -> torch.Tensor:
        n = self.step.load(seqs, ids)
        B = next(b for b in self.sizes if b >= n)
        self.graphs[B].replay()
        return self.outputs[B][:n]


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b = b * 2 if b < 8 else b + 8
    return sizes + [max_batch]
