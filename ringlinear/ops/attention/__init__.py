"""Softmax attention ops. Prefill: SDPA in the model dtype for 16-bit CUDA tensors (sdpa.py), the fp32 reference
otherwise. Decode over a paged KV cache: the Triton kernel on CUDA, the gather reference on CPU. The rules are in
`ringlinear/backend.py`."""
from __future__ import annotations

from ...backend import use_sdpa, use_triton
from . import reference, sdpa
from .reference import causal_attention_varlen


def attention_with_prefix(q, k, v, scale):
    """q [Tq, H, D] are the last Tq of the Tk positions of k, v [Tk, KV, D] (causal). Returns [Tq, H, D]."""
    if use_sdpa(q):
        return sdpa.attention_with_prefix(q, k, v, scale)
    return reference.attention_with_prefix(q, k, v, scale)


def paged_decode_attention(q, K, V, block_tables, context_lens, block_size: int, scale: float, out=None):
    if use_triton(q):
        from .triton import paged_decode_attention as f
        return f(q, K, V, block_tables, context_lens, block_size, scale, out=out)
    return reference.paged_decode_attention(q, K, V, block_tables, context_lens, block_size, scale, out=out)


__all__ = ["attention_with_prefix", "causal_attention_varlen", "paged_decode_attention"]
