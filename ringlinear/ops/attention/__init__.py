"""Softmax attention ops. Prefill: SDPA (flash on CUDA in the model dtype, fp32 reference on CPU). Decode over a
paged KV cache: the Triton kernel on CUDA (`RINGLINEAR_BACKEND` forces), the gather reference on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backend import backend_override, use_triton
from . import reference


def causal_attention_varlen(q, k, v, cu_seqlens, scale, max_seqlen=None):
    """Packed documents without cache (training, scoring). q [T, H, D], k, v [T, KV, D], cu_seqlens [N+1]; on
    CUDA with 16-bit inputs torch's flash varlen kernel (max_seqlen: a host bound on the longest document)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and backend_override() != "torch":
        from .flash_varlen import varlen_causal
        return varlen_causal(q, k, v, cu_seqlens, scale, q.shape[0] if max_seqlen is None else max_seqlen)
    return reference.causal_attention_varlen(q, k, v, cu_seqlens, scale)


def aligned_causal_attention(q, k, v, cu_seqlens, scale, max_seqlen):
    """numerics="aligned" training/scoring: the fixed key-block order that aligned prefill and decode reproduce."""
    if use_triton(q):
        from .triton_aligned import aligned_causal_varlen
        return aligned_causal_varlen(q, k, v, cu_seqlens, scale, max_seqlen)
    from .aligned import aligned_attention
    zeros = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.long)
    return aligned_attention(q, k, v, cu_seqlens.cpu(), zeros, scale, k_cu=cu_seqlens.cpu())


def aligned_paged_attention(q, K, V, q_cu, q_start, block_tables, block_size, scale, max_q, out=None):
    """numerics="aligned" serving: queries q [Tq, H, D] packed by q_cu [N+1] at positions q_start [N].. over the
    paged cache K, V [rows, KV, D] (block_tables [N, MB]); max_q: a host bound on queries per sequence."""
    if use_triton(q):
        from .triton_aligned import aligned_forward
        return aligned_forward(q, K, V, q_cu, q_start, scale, max_q, block_tables=block_tables,
                               block_size=block_size, out=out)[0]
    from .aligned import aligned_attention
    o = aligned_attention(q, K, V, q_cu.cpu(), q_start.cpu(), scale, block_tables=block_tables.cpu(),
                          block_size=block_size)
    if out is not None:
        out.copy_(o)
        return out
    return o


def attention_with_prefix(q, k, v, scale):
    """q [Tq, H, D] are the last Tq of the Tk positions of k, v [Tk, KV, D] (causal). Returns [Tq, H, D]."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and backend_override() != "torch":
        return _sdpa_prefix(q, k, v, scale)
    return reference.attention_with_prefix(q, k, v, scale)


def _sdpa_prefix(q, k, v, scale, max_mask_elems: int = 1 << 27):
    # SDPA in the model dtype (flash / memory-efficient kernels; their softmax runs in fp32).
    Tq, H, D = q.shape
    Tk, KV, _ = k.shape
    kh = k.repeat_interleave(H // KV, 1).transpose(0, 1)[None]  # [1, H, Tk, D]
    vh = v.repeat_interleave(H // KV, 1).transpose(0, 1)[None]
    if Tq == Tk:
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kh, vh, is_causal=True, scale=scale)
        return o[0].transpose(0, 1)
    # A chunk continuing a cached prefix: an explicit bottom-right causal mask, in row blocks so the mask stays
    # small (torch's causal_lower_right bias failed on CUDA for long prefixes in our runs).
    out = torch.empty_like(q)
    off = Tk - Tq
    rows = max(1, min(Tq, max_mask_elems // Tk))
    for a in range(0, Tq, rows):
        b = min(Tq, a + rows)
        keys = off + b
        mask = torch.arange(keys, device=q.device)[None, :] <= (off + torch.arange(a, b, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], kh[:, :, :keys], vh[:, :, :keys],
                                           attn_mask=mask, scale=scale)
        out[a:b] = o[0].transpose(0, 1)
    return out


def paged_decode_attention(q, K, V, block_tables, context_lens, block_size: int, scale: float, out=None):
    if use_triton(q):
        from .triton import paged_decode_attention as f
        return f(q, K, V, block_tables, context_lens, block_size, scale, out=out)
    return reference.paged_decode_attention(q, K, V, block_tables, context_lens, block_size, scale, out=out)


__all__ = ["attention_with_prefix", "causal_attention_varlen", "paged_decode_attention", "aligned_causal_attention",
           "aligned_paged_attention"]
