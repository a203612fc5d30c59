"""Attention contexts: how a forward pass reaches attention state.

The model always runs on *packed* tokens: `T` tokens of `N` sequences laid end to end, described by
`cu_seqlens` [N+1] and absolute `positions` [T]. Layers never touch caches themselves; they hand q, k, v to the
context, which owns whatever state exists:

- `StatelessContext`: no cache (training, scoring): chunked lightning attention and causal softmax per sequence.
- `ringlinear.models.cache.HybridCache`: per-sequence fp32 states and contiguous KV (generate()).
- the serving engine's paged context (`ringlinear.engine`): state slots and block tables.

Any object with these two methods and the two attributes can drive the model.
"""
from __future__ import annotations

import abc

import torch

from ..ops.attention import aligned_causal_attention, causal_attention_varlen
from ..ops.lightning_attn import lightning_attn

# numerics="default": the fastest kernels; "aligned": one arithmetic per position shared by training, prefill and
# decode at any batch (docs/numerics.md), so rollout log-probs equal the trainer's bit for bit.
NUMERICS = ("default", "aligned")


def check_numerics(numerics: str) -> str:
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    return numerics


class AttentionContext(abc.ABC):
    """Protocol. `cu_seqlens` [N+1] int32/int64 and `positions` [T] int64 describe the packed step."""

    cu_seqlens: torch.Tensor
    positions: torch.Tensor

    @abc.abstractmethod
    def linear_attention(self, layer_idx: int, q, k, v, g_gamma, scale: float):
        """q, k, v [T, H, D] (model dtype), g_gamma [H] fp32 -> o [T, H, D]."""

    @abc.abstractmethod
    def softmax_attention(self, layer_idx: int, q, k, v, scale: float):
        """q [T, H, D], k, v [T, KV, D] -> o [T, H, D]; causal within each sequence (plus any cached prefix)."""


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, offsets: torch.Tensor | None = None,
                              total: int | None = None) -> torch.Tensor:
    """[N+1] -> [T] position of every packed token (0-based within its sequence, plus an optional per-seq offset).
    `total` (= T) spares a device-to-host read of cu_seqlens[-1]."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    T = int(cu_seqlens[-1]) if total is None else total
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens, output_size=T)
    pos = torch.arange(T, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]
    if offsets is not None:
        pos = pos + offsets.to(pos.device).long()[seq]
    return pos


class StatelessContext(AttentionContext):
    """No cache: every sequence starts from a zero state and an empty KV (training, scoring).

    cu_seqlens [N+1] on the model's device; max_seqlen: the longest sequence, known on the host (None: the total,
    a valid bound); total: T, to build positions without reading the device."""

    def __init__(self, cu_seqlens: torch.Tensor, positions: torch.Tensor | None = None, chunk_size: int = 64,
                 max_seqlen: int | None = None, total: int | None = None, numerics: str = "default"):
        self.cu_seqlens = cu_seqlens
        self.positions = positions if positions is not None else positions_from_cu_seqlens(cu_seqlens, total=total)
        self.chunk_size = chunk_size
        self.max_seqlen = max_seqlen if max_seqlen is not None else int(self.positions.shape[0])
        self.aligned = check_numerics(numerics) == "aligned"

    def linear_attention(self, layer_idx, q, k, v, g_gamma, scale):
        o, _ = lightning_attn(q[None], k[None], v[None], g_gamma, scale=scale, cu_seqlens=self.cu_seqlens,
                              chunk_size=self.chunk_size, aligned=self.aligned)
        return o[0]

    def softmax_attention(self, layer_idx, q, k, v, scale):
        if self.aligned:
            return aligned_causal_attention(q, k, v, self.cu_seqlens, scale, self.max_seqlen)
        return causal_attention_varlen(q, k, v, self.cu_seqlens, scale, max_seqlen=self.max_seqlen)
