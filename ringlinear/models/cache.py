"""HybridCache: per sequence, one fp32 state [H, D, D] per linear layer and a contiguous KV per softmax layer.

Used by `generate()` and by anyone calling the model step by step. (The serving engine uses paged KV blocks and a
state-slot pool instead: `ringlinear.engine`.) Row i of the cache is sequence i of the batch.
"""
from __future__ import annotations

import copy

import torch

from ..ops.attention import attention_with_prefix
from ..ops.lightning_attn import lightning_attn_decode, lightning_attn_prefill
from .config import RingLinearConfig
from .context import AttentionContext, positions_from_cu_seqlens


class HybridCache:
    def __init__(self, cfg: RingLinearConfig, batch_size: int, dtype=torch.float32, device="cpu",
                 capacity: int = 256):
        self.config = cfg
        self.batch_size = batch_size
        self.dtype, self.device = dtype, torch.device(device)
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # host copy: tokens seen per sequence
        self.states: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for i in cfg.softmax_layers:
            self.keys[i] = torch.zeros(batch_size, capacity, KV, D, dtype=dtype, device=self.device)
            self.values[i] = torch.zeros_like(self.keys[i])
        for i in cfg.linear_layers:
            self.states[i] = torch.zeros(batch_size, H, D, D, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def capacity(self) -> int:
        return next(iter(self.keys.values())).shape[1] if self.keys else 0

    def _ensure_capacity(self, needed: int):
        cap = self.capacity
        if not self.keys or needed <= cap:
            return
        new = max(needed, 2 * cap)
        for d in (self.keys, self.values):
            for i, t in d.items():
                grown = torch.zeros(t.shape[0], new, *t.shape[2:], dtype=t.dtype, device=t.device)
                grown[:, :cap] = t
                d[i] = grown

    def context(self, cu_seqlens: torch.Tensor, lens: torch.Tensor) -> "_CacheContext":
        lens = lens.cpu()
        self._ensure_capacity(int((self.lengths + lens).max()))
        return _CacheContext(self, cu_seqlens, lens)

    def commit(self, lens: torch.Tensor):
        self.lengths += lens.cpu()

    def reset(self, index: int | None = None):
        """Forget sequence `index` (or all): zero state, empty KV."""
        rows = slice(None) if index is None else slice(index, index + 1)
        for t in self.states.values():
            t[rows].zero_()
        for d in (self.keys, self.values):
            for t in d.values():
                t[rows].zero_()
        self.lengths[rows] = 0

    def copy(self) -> "HybridCache":
        return copy.deepcopy(self)

    def fork(self, src: int, dst: int):
        """Make row dst an exact copy of row src (e.g. to sample several continuations of one prompt)."""
        for d in (self.states, self.keys, self.values):
            for t in d.values():
                t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.states, self.keys, self.values) for t in d.values())


class _CacheContext(AttentionContext):
    """One forward step over rows whose new-token counts are `lens` (0 = row idle this step)."""

    def __init__(self, cache: HybridCache, cu_seqlens: torch.Tensor, lens: torch.Tensor):
        self.cache = cache
        self.lens = lens
        self.start = cache.lengths.clone()
        dev = cache.device
        self.cu_seqlens = cu_seqlens.to(dev)
        self.positions = positions_from_cu_seqlens(self.cu_seqlens, self.start.to(dev))
        active = torch.nonzero(lens > 0).flatten()
        self.active = active.to(dev)
        act_lens = lens[active]
        self.active_cu = torch.nn.functional.pad(torch.cumsum(act_lens, 0), (1, 0)).to(dev)
        self.all_decode = bool((act_lens == 1).all())

    def linear_attention(self, layer_idx, q, k, v, g_gamma, scale):
        state = self.cache.states[layer_idx]
        if self.all_decode:
            return lightning_attn_decode(q, k, v, g_gamma, state, slot_ids=self.active, scale=scale)
        o = lightning_attn_prefill(q[None], k[None], v[None], g_gamma, state, self.active, self.active_cu,
                                   scale=scale)
        return o[0]

    def softmax_attention(self, layer_idx, q, k, v, scale):
        K, V = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        out = torch.empty_like(q)
        cu = self.cu_seqlens.tolist()
        for i in self.active.tolist():
            s, e = cu[i], cu[i + 1]
            L0 = int(self.start[i])
            L1 = L0 + (e - s)
            K[i, L0:L1] = k[s:e]
            V[i, L0:L1] = v[s:e]
            out[s:e] = attention_with_prefix(q[s:e], K[i, :L1], V[i, :L1], scale)
        return out
