"""Chunk-aligned lightning attention on Triton (numerics="aligned"; `aligned.py` is the spec): serving prefill that
keeps the open chunk aside, and a decode kernel that computes a token's row of its open chunk with the forward
kernel's own arithmetic (`_chunk_out`, `_state_update`) at the same tile shapes and launch config.

Decode reads the boundary state once and writes it only when the chunk closes (every BT tokens): per step it moves
about the recurrence's bytes (state read + open-chunk k/v read, ~1.5x the state), never the state write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton as base
from .._triton import patch_interpreter
from .triton_kernels import _chunk_out, _chunk_weights, _decay_consts, _state_update

patch_interpreter()


@triton.jit
def _decode_aligned_kernel(q, k, v, o, g, state, open_k, open_v, slots, positions, sq, sk, sv, scale,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                           LOWP: tl.constexpr, PREC: tl.constexpr):
    """One program per (request, head, value block). The open chunk's rows 0..i-1 come from the buffers, row i is
    this token (also appended to the buffers); rows past i are zeros, which the causal mask ignores exactly."""
    NV: tl.constexpr = V // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_h = (pid // NV) % H
    i_n = (pid // (NV * H)).to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    i = (tl.load(positions + i_n) % BT).to(tl.int32)
    gl, rt, d_row, mask = _decay_consts(g, i_h, BT)
    rk = tl.arange(0, K)
    rv = i_v * BV + tl.arange(0, BV)
    st = state + ((slot * H + i_h) * K + rk[:, None]) * V + rv[None, :]
    S = tl.load(st)
    new_q = tl.load(q + i_n * sq + i_h * K + rk)
    new_k = tl.load(k + i_n * sk + i_h * K + rk)
    new_v = tl.load(v + i_n * sv + i_h * V + rv)
    buf = (slot * BT + rt.to(tl.int64)) * H + i_h                      # [BT] rows of the open-chunk buffers
    seen = rt < i
    is_i = (rt == i)[:, None]
    b_k = tl.where(is_i, new_k[None, :], tl.load(open_k + buf[:, None] * K + rk[None, :], mask=seen[:, None],
                                                 other=0.0))
    b_v = tl.where(is_i, new_v[None, :], tl.load(open_v + buf[:, None] * V + rv[None, :], mask=seen[:, None],
                                                 other=0.0))
    b_q = tl.where(is_i, new_q[None, :], tl.zeros([BT, K], dtype=new_q.dtype))
    b_o = _chunk_out(b_q, b_k, b_v, S, mask, d_row, LOWP, PREC)
    tl.store(o + (i_n * H + i_h) * V + rv[None, :] + rt[:, None] * 0, (b_o * scale).to(o.dtype.element_ty),
             mask=is_i)
    row = (slot * BT + i) * H + i_h
    if i_v == 0:
        tl.store(open_k + row * K + rk, new_k)
    tl.store(open_v + row * V + rv, new_v)
    # the fold as the forward computes it, always (same code around the dots); stored only when the chunk closes
    c, w = _chunk_weights(gl, rt, 0, BT, BT)
    S_new = _state_update(S, b_k, b_v, w, tl.exp2(gl * c), LOWP, PREC)
    tl.store(st, S_new, mask=(rk[:, None] >= 0) & (i == BT - 1))


def open_chunk_rows(K: int, V: int, dtype: torch.dtype) -> int:
    """Rows of the open-chunk buffers the aligned kernels use: the forward's chunk (64 for 16-bit inputs)."""
    return base.aligned_config(K, V, dtype)[0]


def lightning_attn_prefill_aligned(q, k, v, g_gamma, state, open_k, open_v, slot_ids, cu_seqlens, starts,
                                   scale=None):
    """Same contract as aligned.lightning_attn_prefill_aligned; open_k/open_v [S, BT, H, D] (BT from
    open_chunk_rows). `starts` is checked on the host only when it is a CPU tensor."""
    g, scale = base._prep(q, k, v, g_gamma, scale)
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = open_chunk_rows(K, V, q.dtype)
    if open_k.shape[1:] != (BT, H, K) or open_v.shape[1:] != (BT, H, V):
        raise ValueError(f"open-chunk buffers must be [S, {BT}, H, D], got {tuple(open_k.shape)}")
    if starts.device.type == "cpu" and bool((starts % BT != 0).any()):
        raise ValueError(f"aligned prefill must start on a chunk boundary (multiple of {BT}), got {starts.tolist()}")
    slots = slot_ids.to(device=q.device, dtype=torch.int32)
    plan = base._Plan(B, T, H, K, V, cu_seqlens, q.device, q.dtype, aligned=True)
    with torch.no_grad():
        o, _, _ = base._forward(q, k, v, g, scale, state, True, plan, slots=slots, ht_out=state,
                                open_kv=(open_k, open_v))
    return o


def lightning_attn_decode_aligned(q, k, v, g_gamma, state, open_k, open_v, slot_ids, positions, scale=None,
                                  out=None):
    """Same contract as aligned.lightning_attn_decode_aligned. No host syncs; with `out` no allocations (CUDA-graph
    safe; g_gamma must then already be fp32 on the device)."""
    N, H, K = q.shape
    V = v.shape[-1]
    if g_gamma.dtype != torch.float32 or g_gamma.device != q.device:
        g_gamma = g_gamma.to(device=q.device, dtype=torch.float32)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if out is None:
        out = torch.empty(N, H, V, device=q.device, dtype=q.dtype)
    bt, bv, warps, _ = base.aligned_config(K, V, q.dtype)
    prec, lowp = base._prec(q.dtype)
    _decode_aligned_kernel[(N * H * (V // bv),)](
        q, k, v, out, g_gamma, state, open_k, open_v, slot_ids, positions, q.stride(0), k.stride(0), v.stride(0),
        K ** -0.5 if scale is None else float(scale), H=H, K=K, V=V, BT=bt, BV=bv, LOWP=lowp, PREC=prec,
        num_warps=warps, enable_fp_fusion=False)
    return out
