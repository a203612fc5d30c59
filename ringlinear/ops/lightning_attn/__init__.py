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
                   chunk_size=64, aligned=False):
    return _impl(q).lightning_attn(q, k, v, g_gamma, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                   chunk_size=chunk_size, aligned=aligned)


def lightning_attn_decode(q, k, v, g_gamma, state, slot_ids=None, scale=None, out=None):
    return _impl(q).lightning_attn_decode(q, k, v, g_gamma, state, slot_ids=slot_ids, scale=scale, out=out)


def lightning_attn_prefill(q, k, v, g_gamma, state, slot_ids, cu_seqlens, scale=None, chunk_size=64, plans=None,
                           segmented=False):
    return _impl(q).lightning_attn_prefill(q, k, v, g_gamma, state, slot_ids, cu_seqlens, scale=scale,
                                           chunk_size=chunk_size, plans=plans, segmented=segmented)


def _aligned_impl(t):
    if use_triton(t):
        from . import triton_aligned as impl  # noqa: PLC0415
        return impl
    from . import aligned as impl  # noqa: PLC0415
    return impl


def open_chunk_rows(q) -> int:
    """Rows of the open-chunk buffers aligned serving keeps per slot, for queries like q [.., H, D]."""
    if use_triton(q):
        from .triton_aligned import open_chunk_rows as rows
        return rows(q.shape[-1], q.shape[-1], q.dtype)
    from .aligned import C
    return C


def lightning_attn_prefill_aligned(q, k, v, g_gamma, state, open_k, open_v, slot_ids, cu_seqlens, starts,
                                   scale=None):
    return _aligned_impl(q).lightning_attn_prefill_aligned(q, k, v, g_gamma, state, open_k, open_v, slot_ids,
                                                           cu_seqlens, starts, scale=scale)


def lightning_attn_decode_aligned(q, k, v, g_gamma, state, open_k, open_v, slot_ids, positions, scale=None,
                                  out=None):
    return _aligned_impl(q).lightning_attn_decode_aligned(q, k, v, g_gamma, state, open_k, open_v, slot_ids,
                                                          positions, scale=scale, out=out)


lightning_attn_recurrent = reference.lightning_attn_recurrent

__all__ = ["lightning_attn", "lightning_attn_decode", "lightning_attn_prefill", "lightning_attn_recurrent",
           "lightning_attn_prefill_aligned", "lightning_attn_decode_aligned", "open_chunk_rows"]
