"""The engine's attention context: linear layers read and write state slots, softmax layers the paged KV cache.

A step packs N sequences: the first `num_decode` have one token each (decode kernels), the rest are prefill
pieces (chunked kernels continuing from the slot state / cached prefix). Which path a sequence takes depends only
on its own piece, never on the rest of the batch, so its numbers do not change with the batch (docs/numerics.md).
"""
from __future__ import annotations

import torch

from ..models.context import AttentionContext
from ..ops.attention import (aligned_paged_attention, causal_attention_varlen, paged_decode_attention,
                             prefix_attention_varlen)
from ..ops.lightning_attn import (lightning_attn_decode, lightning_attn_decode_aligned, lightning_attn_prefill,
                                  lightning_attn_prefill_aligned)
from ..ops.linear import suspended
from .kv_cache import PagedKVCache
from .state_pool import StatePool

PREFIX_GATHER_ROWS = 32768  # context rows gathered per packed call of prefixed pieces (a group may exceed it alone)


class PagedDecode:
    """Attention for one new token per sequence over the engine's memory, shared by the eager `PagedContext` (its
    decode rows) and the CUDA-graph step (static buffers): a linear layer updates each sequence's state slot in
    place; a softmax layer writes the token's K/V row, then attends over the sequence's block table.

    slot_ids [B] int64, write_rows [B] int64 (flat KV row of each new token), block_tables [B, MB] int,
    context_lens [B] int (>= 1, the new token included), positions [B] int64 (context_lens - 1); all on the model's
    device. aligned: the chunk-aligned lightning decode (open-chunk buffers) and the fixed key-order attention.
    """

    def __init__(self, kv: PagedKVCache, states: StatePool, slot_ids, write_rows, block_tables, context_lens,
                 positions=None, aligned: bool = False):
        self.kv, self.states = kv, states
        self.slot_ids, self.write_rows = slot_ids, write_rows
        self.block_tables, self.context_lens = block_tables, context_lens
        self.positions, self.aligned = positions, aligned
        if aligned:
            self.q_cu = torch.arange(slot_ids.shape[0] + 1, dtype=torch.int32, device=slot_ids.device)

    def linear(self, layer_idx, q, k, v, g_gamma, scale, out=None):  # q, k, v [B, H, D]
        st = self.states
        if self.aligned:
            return lightning_attn_decode_aligned(q, k, v, g_gamma, st.states[layer_idx], st.open_k[layer_idx],
                                                 st.open_v[layer_idx], self.slot_ids, self.positions, scale=scale,
                                                 out=out)
        return lightning_attn_decode(q, k, v, g_gamma, st.states[layer_idx], slot_ids=self.slot_ids, scale=scale,
                                     out=out)

    def softmax(self, layer_idx, q, k, v, scale, out=None):  # q [B, H, D], k, v [B, KV, D]
        K, V = self.kv.flat(layer_idx)
        K.index_copy_(0, self.write_rows, k)
        V.index_copy_(0, self.write_rows, v)
        if self.aligned:
            return aligned_paged_attention(q, K, V, self.q_cu, self.positions, self.block_tables, self.kv.block_size,
                                           scale, 1, out=out)
        return paged_decode_attention(q, K, V, self.block_tables, self.context_lens, self.kv.block_size, scale,
                                      out=out)


class PagedContext(AttentionContext):
    """Eager context for any mix of decode and prefill pieces.

    seq_lens / starts: tokens computed this step and the position of the first one, per sequence (host ints).
    """

    def __init__(self, kv: PagedKVCache, states: StatePool, slots: list[int], block_tables: list[list[int]],
                 starts: list[int], seq_lens: list[int], num_decode: int, device, aligned: bool = False):
        self.kv, self.states = kv, states
        self.aligned = aligned
        self.starts, self.seq_lens = starts, seq_lens
        self.block_tables = block_tables
        self.num_decode = num_decode
        self.device = device
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        self.cu = cu
        self.cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        self.positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, seq_lens)]).to(device)
        self.slot_ids = torch.tensor(slots, dtype=torch.long, device=device)
        nd = num_decode
        # The prefill pieces' offsets and slots in the kernels' int32, made once per step (each linear layer would
        # convert them otherwise), and the lightning prefill's launch plans, built by the first linear layer.
        self.prefill_cu = self.cu_seqlens[nd:] - cu[nd]
        self.prefill_slots = self.slot_ids[nd:].to(torch.int32)
        self.lightning_plans: dict = {}
        # Flat cache rows of every new token [T] (write targets); reads: decode rows through their block tables
        # [nd, max blocks] (paged kernel), prefill pieces as `_plan_softmax_prefill` sets up.
        self.write_rows = torch.cat([kv.token_rows(bt, s, s + n)
                                     for bt, s, n in zip(block_tables, starts, seq_lens)]).to(device)
        width = max((len(bt) for bt in block_tables[:nd]), default=0)
        tables = torch.tensor([bt + [0] * (width - len(bt)) for bt in block_tables[:nd]],
                              dtype=torch.int32).reshape(nd, width).to(device)
        lens = torch.tensor([s + 1 for s in starts[:nd]], dtype=torch.int32).to(device)
        self.decode = PagedDecode(kv, states, self.slot_ids[:nd], self.write_rows[:nd], tables, lens,
                                  positions=self.positions[:nd], aligned=aligned)
        if not aligned:
            self._plan_softmax_prefill(kv, block_tables, starts, seq_lens, nd, device)
        if aligned:  # one fixed-order kernel for every row of the step: all tables, all starts
            wide = max(len(bt) for bt in block_tables)
            self.all_tables = torch.tensor([bt + [0] * (wide - len(bt)) for bt in block_tables],
                                           dtype=torch.int32).to(device)
            self.starts_cpu = torch.tensor(starts, dtype=torch.long)
            self.starts_dev = self.starts_cpu.to(device)
            self.max_q = max(seq_lens)

    def _plan_softmax_prefill(self, kv, block_tables, starts, seq_lens, nd, device):
        """Prefill pieces that start at position 0 attend only to their own new keys: all of them go through one
        packed causal varlen call (flash varlen on CUDA: no gather from the cache, no repeated KV heads, no call per
        piece). Pieces continuing a cached prefix go through packed calls too, over their context rows gathered from
        the cache (queries aligned to the end of their keys), in groups of bounded context. Either way a piece sees
        only its own keys, so its result does not depend on the rest of the batch."""
        n = len(seq_lens)
        fresh = [i for i in range(nd, n) if starts[i] == 0]
        prefixed = [i for i in range(nd, n) if starts[i] > 0]
        self.fresh_rows = self._rows(fresh, device)  # packed rows of the fresh pieces (a slice when adjacent)
        self.fresh_only = nd == 0 and not prefixed  # every row is a fresh piece: the packed call's output is all
        if fresh:
            self.fresh_cu = self._offsets([seq_lens[i] for i in fresh], device)
            self.fresh_max = max(seq_lens[i] for i in fresh)
        # Prefixed pieces in groups whose gathered context stays under PREFIX_GATHER_ROWS (64 pieces on 2K-token
        # prefixes would gather 256 MiB per layer at Ring-mini's KV width in one go); a piece's result does not
        # depend on its group. Each group: (query rows, context rows [sum of contexts] int64, cu_q, cu_k, max_q,
        # max_k), on the device.
        groups, cur, size = [], [], 0
        for i in prefixed:
            c = starts[i] + seq_lens[i]
            if cur and size + c > PREFIX_GATHER_ROWS:
                groups.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += c
        if cur:
            groups.append(cur)
        self.prefix_groups = []
        for g in groups:
            ctx = [starts[j] + seq_lens[j] for j in g]
            self.prefix_groups.append((
                self._rows(g, device),
                torch.cat([kv.token_rows(block_tables[j], 0, c) for j, c in zip(g, ctx)]).to(device),
                self._offsets([seq_lens[j] for j in g], device), self._offsets(ctx, device),
                max(seq_lens[j] for j in g), max(ctx)))

    def _rows(self, pieces: list[int], device):
        """Packed rows of `pieces`: None, a slice when they are adjacent (new requests come last), else an index."""
        if not pieces:
            return None
        cu = self.cu
        if all(b == a + 1 for a, b in zip(pieces, pieces[1:])):
            return slice(cu[pieces[0]], cu[pieces[-1] + 1])
        return torch.cat([torch.arange(cu[i], cu[i + 1]) for i in pieces]).to(device)

    @staticmethod
    def _offsets(lens: list[int], device) -> torch.Tensor:
        cu = [0]
        for x in lens:
            cu.append(cu[-1] + x)
        return torch.tensor(cu, dtype=torch.int32, device=device)

    def linear_attention(self, layer_idx, q, k, v, g_gamma, scale):  # q, k, v [T, H, D]
        with suspended():
            return self._linear(layer_idx, q, k, v, g_gamma, scale)

    def softmax_attention(self, layer_idx, q, k, v, scale):  # q [T, H, D], k, v [T, KV, D]
        with suspended():
            return self._softmax(layer_idx, q, k, v, scale)

    def _linear(self, layer_idx, q, k, v, g_gamma, scale):
        nd = self.num_decode
        if nd == len(self.seq_lens):
            return self.decode.linear(layer_idx, q, k, v, g_gamma, scale)
        out = torch.empty_like(q) if nd else None
        if nd:
            self.decode.linear(layer_idx, q[:nd], k[:nd], v[:nd], g_gamma, scale, out=out[:nd])
        st = self.states
        if self.aligned:
            o = lightning_attn_prefill_aligned(q[None, nd:], k[None, nd:], v[None, nd:], g_gamma,
                                               st.states[layer_idx], st.open_k[layer_idx], st.open_v[layer_idx],
                                               self.slot_ids[nd:], self.prefill_cu, self.starts_cpu[nd:],
                                               scale=scale)
        else:
            o = lightning_attn_prefill(q[None, nd:], k[None, nd:], v[None, nd:], g_gamma, st.states[layer_idx],
                                       self.prefill_slots, self.prefill_cu, scale=scale, plans=self.lightning_plans)
        if not nd:  # prefill pieces only: the kernel's output is the layer's output, no copy into `out`
            return o[0]
        out[nd:] = o[0]
        return out

    def _softmax(self, layer_idx, q, k, v, scale):
        nd = self.num_decode
        if self.aligned:  # every row of the step through one fixed key-order kernel, decode rows included
            K, V = self.kv.flat(layer_idx)
            K[self.write_rows] = k
            V[self.write_rows] = v
            return aligned_paged_attention(q, K, V, self.cu_seqlens, self.starts_dev, self.all_tables,
                                           self.kv.block_size, scale, self.max_q)
        # Each sequence over its own context only (the paged kernel's splits are fixed-size): its result cannot
        # depend on its neighbours.
        out = None if self.fresh_only else torch.empty_like(q)
        if nd:
            self.decode.softmax(layer_idx, q[:nd], k[:nd], v[:nd], scale, out=out[:nd])
        K, V = self.kv.flat(layer_idx)
        K[self.write_rows[nd:]] = k[nd:]  # the prefill pieces' rows (decode rows: written above)
        V[self.write_rows[nd:]] = v[nd:]
        rows = self.fresh_rows
        if rows is not None:
            o = causal_attention_varlen(q[rows], k[rows], v[rows], self.fresh_cu, scale, max_seqlen=self.fresh_max)
            if out is None:
                return o
            out[rows] = o
        for rows, ctx, cu_q, cu_k, max_q, max_k in self.prefix_groups:
            out[rows] = prefix_attention_varlen(q[rows], K[ctx], V[ctx], cu_q, cu_k, scale, max_q, max_k)
        return out
