"""Lightning attention: dispatch between the reference (CPU) and the Triton kernels (CUDA).

Signatures are those of `reference.py`; see its docstring for layouts and semantics.
"""
from __future__ import annotations

from ...backend import use_triton
from . import reference


def _impl(t):
    if use_triton(t):
        from . import triton as impl  # noqa: PLC0415  (Triton is optional: import only when used)
        return impl
    return reference


def lightning_attn(q, k, v, g_gamma, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   chunk_size=64):
    return _impl(q).lightning_attn(q, k, v, g_gamma, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                   chunk_size=chunk_size)


def lightning_attn_decode(q, k, v, g_gamma, state, slot_ids=None, scale=None, out=None):
    return _impl(q).lightning_attn_decode(q, k, v, g_gamma, state, slot_ids=slot_ids, scale=scale, out=out)


def lightning_attn_prefill(q, k, v, g_gamma, state, slot_ids, cu_seqlens, scale=None, chunk_size=64):
    return _impl(q).lightning_attn_prefill(q, k, v, g_gamma, state, slot_ids, cu_seqlens, scale=scale,
                                           chunk_size=chunk_size)


lightning_attn_recurrent = reference.lightning_attn_recurrent

__all__ = ["lightning_attn", "lightning_attn_decode", "lightning_attn_prefill", "lightning_attn_recurrent"]
