"""Softmax attention ops. Training over packed documents: torch's flash varlen kernel for 16-bit CUDA tensors.
Prefill: SDPA in the model dtype for 16-bit CUDA tensors (sdpa.py), the fp32 reference otherwise. Decode over a
paged KV cache: the Triton kernel on CUDA, the gather reference on CPU. numerics="aligned": one fixed key order for
all three (aligned.py, triton_aligned.py). The rules are in `ringlinear/backend.py`."""
from __future__ import annotations

import torch

from ...backend import use_sdpa, use_triton
from . import aligned, reference, sdpa


def causal_attention_varlen(q, k, v, cu_seqlens, scale, max_seqlen=None):
    """Packed documents without cache (training, scoring). q [T, H, D], k, v [T, KV, D], cu_seqlens [N+1]; on
    CUDA with 16-bit inputs torch's flash varlen kernel (max_seqlen: a host bound on the longest document)."""
    if use_sdpa(q):  # the same rule: 16-bit CUDA tensors unless the torch backend is forced
        from .flash_varlen import varlen_causal
        return varlen_causal(q, k, v, cu_seqlens, scale, q.shape[0] if max_seqlen is None else max_seqlen)
    return reference.causal_attention_varlen(q, k, v, cu_seqlens, scale)


def aligned_causal_attention(q, k, v, cu_seqlens, scale, max_seqlen):
    """numerics="aligned" training/scoring: the fixed key-block order that aligned prefill and decode reproduce."""
    if use_triton(q):
        from .triton_aligned import aligned_causal_varlen
        return aligned_causal_varlen(q, k, v, cu_seqlens, scale, max_seqlen)
    zeros = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.long)
    return aligned.aligned_attention(q, k, v, cu_seqlens.cpu(), zeros, scale, k_cu=cu_seqlens.cpu())


def aligned_paged_attention(q, K, V, q_cu, q_start, block_tables, block_size, scale, max_q, out=None):
    """numerics="aligned" serving: queries q [Tq, H, D] packed by q_cu [N+1] at positions q_start [N].. over the
    paged cache K, V [rows, KV, D] (block_tables [N, MB]); max_q: a host bound on queries per sequence."""
    if use_triton(q):
        from .triton_aligned import aligned_forward
        return aligned_forward(q, K, V, q_cu, q_start, scale, max_q, block_tables=block_tables,
                               block_size=block_size, out=out)[0]
    o = aligned.aligned_attention(q, K, V, q_cu.cpu(), q_start.cpu(), scale, block_tables=block_tables.cpu(),
                                  block_size=block_size)
    if out is not None:
        out.copy_(o)
        return out
    return o


def attention_with_prefix(q, k, v, scale):
    """q [Tq, H, D] are the last Tq of the Tk positions of k, v [Tk, KV, D] (causal). Returns [Tq, H, D]."""
    if use_sdpa(q):
        return sdpa.attention_with_prefix(q, k, v, scale)
    return reference.attention_with_prefix(q, k, v, scale)


def prefix_attention_varlen(q, k, v, cu_q, cu_k, scale, max_q: int, max_k: int):
    """Prefill pieces continuing cached prefixes, packed: piece n's queries q[cu_q[n]:cu_q[n+1]] ([Tq, H, D]) are
    the last positions of its keys k, v[cu_k[n]:cu_k[n+1]] ([Tk, KV, D]); max_q, max_k: host bounds on a piece's
    queries and keys. Flash varlen for 16-bit CUDA tensors (one call, no repeated KV heads), else the reference
    (one attention_with_prefix per piece: the same numbers as calling it piece by piece)."""
    if use_sdpa(q):
        from .flash_varlen import varlen_prefix_causal
        return varlen_prefix_causal(q, k, v, cu_q, cu_k, scale, max_q, max_k)
    return reference.prefix_attention_varlen(q, k, v, cu_q, cu_k, scale)


def paged_decode_attention(q, K, V, block_tables, context_lens, block_size: int, scale: float, out=None):
    if use_triton(q):
        from .triton import paged_decode_attention as f
        return f(q, K, V, block_tables, context_lens, block_size, scale, out=out)
    return reference.paged_decode_attention(q, K, V, block_tables, context_lens, block_size, scale, out=out)


__all__ = ["attention_with_prefix", "causal_attention_varlen", "paged_decode_attention", "aligned_causal_attention",
           "aligned_paged_attention", "prefix_attention_varlen"]
