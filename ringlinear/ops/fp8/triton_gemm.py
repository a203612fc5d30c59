"""Blockwise-scaled FP8 GEMMs over expert-sorted rows (the fused MoE's plan), used for the dense layers too.

A dense layer is the one-expert case: pair = arange(T), eoff = [0, T], top_k = 1 (`identity_plan`). Every GEMM
runs K in blocks of 128: each block's e4m3 (or e5m2) product comes from a fresh `tl.dot` (fp32 result on the
tensor cores, so the tensor-core accumulation never spans more than 128 products) and is added to an fp32
accumulator times a_scale[row, kb] * b_scale[n, kb] (DeepSeek-V3's promotion interval). Operands are always
K-contiguous in memory (weights are kept in both orientations), as Hopper's fp8 wgmma wants.

- `gateup`: A = x's FP8 rows gathered by token, B = W13_e (128x128 blocks); epilogue: gate/up in the model dtype
  (saved for backward), h = silu(g) u in fp32 quantised to FP8 rows (the down GEMM's input) and, for training,
  to FP8 cols (the down weight gradient's input).
- `rows_gemm`: out[pair] = A_row B_e (down forward, dx).
- `dswiglu`: g = dY's FP8 rows gathered by token times W2_e^T; epilogue: d topk_weight partials, dgate/dup
  quantised to FP8 rows (for dx) and cols (for dW13).
- `wgrad`: dW_e = A^T B over expert e's sorted rows, both operands FP8 cols (1x128 along the rows).
Determinism as in the fused MoE: fixed tiles and K order, outputs written once, no atomics except the integer
non-finite counter; a row's forward result does not depend on the other rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..moe.triton_gemm import LARGE_ROWS_PER_EXPERT, _row_tile
from .reference import FP8_MAX, TILE, row_tile_bound
from .triton_quant import TL_FP8, count_nonfinite, store_cols, store_rows

# The default tile: the quantising epilogues need 128-row x 128-column tiles (a 1x128 tile per row and per column),
# and a 128-column tile is exactly one weight block (one scalar scale per K step). Warps and stages only change
# speed, not the numbers.
CFG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
# GEMMs over few rows per expert (decode, short prefill, small training batches: fewer than LARGE_ROWS_PER_EXPERT
# on average) stream weights and waste most of a 128-row tile: 64-row tiles (8 warps: two warpgroups), as
# the bf16 fused MoE's small tier. Only where no 128-row column tile is stored: gateup without SAVE and rows_gemm
# (the down forward, dx in backward, the dense Triton fallback). Both tiles are whole wgmma m64 steps over the same
# 128-long K blocks, so a row's result does not depend on the tier (tests/ops/test_fp8_gemm.py checks a token's
# rows bitwise between a call in each tier, e4m3 and e5m2 A operands, on the GPU).
SMALL_CFG = dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)


def dense_eoff(T, device):
    """eoff = [0, T] int32 of the one-expert plan, made by device kernels only: `eoff[1] = T` would copy a CPU
    scalar tensor, which CUDA graph capture refuses."""
    return torch.arange(2, dtype=torch.int32, device=device) * T


def identity_plan(T, device):
    """The one-expert plan of a dense layer: (pair = arange(T) int32, eoff = [0, T] int32)."""
    return torch.arange(T, dtype=torch.int32, device=device), dense_eoff(T, device)


@triton.jit
def _a_block(a_rows, rmask, as_ptr, as_idx, kb, NA):
    """One K block of A: fp8 [BM, 128] from row pointers a_rows, and its scales [BM] (scale layout [kb, NA])."""
    a = tl.load(a_rows[:, None] + kb * 128 + tl.arange(0, 128)[None, :], mask=rmask[:, None], other=0.0)
    sa = tl.load(as_ptr + kb * NA + as_idx, mask=rmask, other=0.0)
    return a, sa


@triton.jit
def _b_block(b_ptr, ns, ldb, bs_ptr, nb, KB, kb):
    """One K block of B [N, K] (K contiguous): fp8 [128, 128] at rows ns (block nb of 128 rows) and its 128x128
    block scale, one scalar ([N/128, KB] layout): the tile is exactly one weight block."""
    b = tl.load(b_ptr + ns[:, None].to(tl.int64) * ldb + kb * 128 + tl.arange(0, 128)[None, :])
    sb = tl.load(bs_ptr + nb * KB + kb)
    return b, sb


@triton.jit
def _gateup_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, pair_ptr, eoff_ptr, ab_ptr, hq_ptr, hs_ptr, hqt_ptr, hst_ptr,
                   cnt_ptr, NX, NK, ldhqt, stride_we, stride_wse, I: tl.constexpr, H: tl.constexpr,
                   TOPK: tl.constexpr, E: tl.constexpr, SAVE: tl.constexpr, POW2: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    e, rows, rmask, ns, pn = _row_tile(eoff_ptr, I, E, BLOCK_M, BLOCK_N)
    if e >= E:
        return
    t = tl.program_id(0) // (I // BLOCK_N)
    tok = tl.load(pair_ptr + rows, mask=rmask, other=0) // TOPK
    a_rows = xq_ptr + tok.to(tl.int64) * H
    wb = w_ptr + e.to(tl.int64) * stride_we
    wsb = ws_ptr + e.to(tl.int64) * stride_wse
    KB: tl.constexpr = H // 128
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, KB):
        a, sa = _a_block(a_rows, rmask, xs_ptr, tok, kb, NX)
        bg, sg = _b_block(wb, ns, H, wsb, pn, KB, kb)
        bu, su = _b_block(wb, I + ns, H, wsb, I // 128 + pn, KB, kb)
        acc_g += tl.dot(a, tl.trans(bg)) * (sa * sg)[:, None]
        acc_u += tl.dot(a, tl.trans(bu)) * (sa * su)[:, None]
    dt = ab_ptr.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)          # gate/up in the model dtype, as the reference's linears round them
    u = acc_u.to(dt).to(tl.float32)
    r64 = rows[:, None].to(tl.int64)
    if SAVE:
        tl.store(ab_ptr + r64 * (2 * I) + ns[None, :], g.to(dt), mask=rmask[:, None])
        tl.store(ab_ptr + r64 * (2 * I) + I + ns[None, :], u.to(dt), mask=rmask[:, None])
    h = g * tl.sigmoid(g) * u
    count_nonfinite(tl.where(rmask[:, None], h, 0.0), cnt_ptr)
    store_rows(h, rows, rmask, ns, ns < I, hq_ptr, I, hs_ptr + pn * NK, tl.float8e4nv, 448.0, POW2)
    if SAVE:
        store_cols(h, tl.arange(0, BLOCK_M), rmask, ns, ns < I, hqt_ptr + t * BLOCK_M, ldhqt, hst_ptr + t * I,
                   tl.float8e4nv, 448.0, POW2)


@triton.jit
def _rows_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, pair_ptr, eoff_ptr, out_ptr, NA, stride_be, stride_bse, stride_o,
                 K: tl.constexpr, NOUT: tl.constexpr, TOPK: tl.constexpr, E: tl.constexpr, A_GATHER: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[pair] = A_row B_e^T; A row = the sorted row, or its token's row when A_GATHER; B_e [NOUT, K]."""
    e, rows, rmask, ns, pn = _row_tile(eoff_ptr, NOUT, E, BLOCK_M, BLOCK_N)
    if e >= E:
        return
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
    arow = (pair // TOPK) if A_GATHER else rows
    a_rows = a_ptr + arow.to(tl.int64) * K
    bb = b_ptr + e.to(tl.int64) * stride_be
    bsb = bs_ptr + e.to(tl.int64) * stride_bse
    KB: tl.constexpr = K // 128
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, KB):
        a, sa = _a_block(a_rows, rmask, as_ptr, arow, kb, NA)
        b, sb = _b_block(bb, ns, K, bsb, pn, KB, kb)
        acc += tl.dot(a, tl.trans(b)) * (sa * sb)[:, None]
    tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_o + ns[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None])


@triton.jit
def _dswiglu_kernel(dq_ptr, ds_ptr, w_ptr, ws_ptr, ab_ptr, wt_ptr, pair_ptr, eoff_ptr, part_ptr, gq_ptr, gs_ptr,
                    gqt_ptr, gst_ptr, cnt_ptr, NX, NK, ldgqt, stride_we, stride_wse, I: tl.constexpr,
                    H: tl.constexpr, TOPK: tl.constexpr, E: tl.constexpr, WEIGHTED: tl.constexpr,
                    QDT: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """g = dY[tok] W2_e (W2T_e [I, H] K-contiguous); dh = w g; d(gate|up) quantised to rows [NK, 2I] and cols;
    part[n-tile, pair] = g . h (d topk_weight partials, summed over n-tiles in a fixed order later)."""
    e, rows, rmask, ns, pn = _row_tile(eoff_ptr, I, E, BLOCK_M, BLOCK_N)
    if e >= E:
        return
    t = tl.program_id(0) // (I // BLOCK_N)
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
    tok = pair // TOPK
    a_rows = dq_ptr + tok.to(tl.int64) * H
    wb = w_ptr + e.to(tl.int64) * stride_we
    wsb = ws_ptr + e.to(tl.int64) * stride_wse
    KB: tl.constexpr = H // 128
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, KB):
        a, sa = _a_block(a_rows, rmask, ds_ptr, tok, kb, NX)
        b, sb = _b_block(wb, ns, H, wsb, pn, KB, kb)
        acc += tl.dot(a, tl.trans(b)) * (sa * sb)[:, None]
    r64 = rows[:, None].to(tl.int64)
    m2 = rmask[:, None]
    g = tl.load(ab_ptr + r64 * (2 * I) + ns[None, :], mask=m2, other=0.0).to(tl.float32)
    u = tl.load(ab_ptr + r64 * (2 * I) + I + ns[None, :], mask=m2, other=0.0).to(tl.float32)
    # SwiGLU' as two factors, so only dh and the factors stay live through the four quantising stores:
    # d gate = dh * u * s (1 + g (1 - s)), d up = dh * g * s, with s = sigmoid(g)
    sg = tl.sigmoid(g)
    f_up = g * sg
    f_gate = u * sg * (1.0 + g * (1.0 - sg))
    if WEIGHTED:
        tl.store(part_ptr + pn * NK + pair, tl.sum(acc * (f_up * u), 1), mask=rmask)
        acc = acc * tl.load(wt_ptr + pair, mask=rmask, other=0.0)[:, None]
    cm = ns < I
    lr = tl.arange(0, BLOCK_M)
    du = tl.where(m2, acc * f_up, 0.0)
    count_nonfinite(du, cnt_ptr)
    store_rows(du, rows, rmask, I + ns, cm, gq_ptr, 2 * I, gs_ptr + (I // 128 + pn) * NK, QDT, FMAX, POW2)
    store_cols(du, lr, rmask, I + ns, cm, gqt_ptr + t * BLOCK_M, ldgqt, gst_ptr + t * (2 * I), QDT, FMAX, POW2)
    dg = tl.where(m2, acc * f_gate, 0.0)
    count_nonfinite(dg, cnt_ptr)
    store_rows(dg, rows, rmask, ns, cm, gq_ptr, 2 * I, gs_ptr + pn * NK, QDT, FMAX, POW2)
    store_cols(dg, lr, rmask, ns, cm, gqt_ptr + t * BLOCK_M, ldgqt, gst_ptr + t * (2 * I), QDT, FMAX, POW2)


@triton.jit
def _wgrad_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, eoff_ptr, out_ptr, lda, ldb, stride_oe, stride_om,
                  MO: tl.constexpr, NO: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[e] [MO, NO] = sum over expert e's 128-row tiles t of A_t^T B_t: A^T [MO, slots*128], B^T [NO, ...]
    (FP8 cols, zero past each expert's rows), scales [slots, MO] / [slots, NO]. Tiles run in order; experts
    without rows get zeros."""
    NT_M: tl.constexpr = MO // BLOCK_M
    NT_N: tl.constexpr = NO // BLOCK_N
    pid = tl.program_id(0)
    e = pid // (NT_M * NT_N)
    ms = ((pid // NT_N) % NT_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % NT_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    es = tl.arange(0, E)
    cnt = tl.load(eoff_ptr + es + 1) - tl.load(eoff_ptr + es)
    t0 = tl.sum(tl.where(es < e, (cnt + 127) // 128, 0), 0)                  # this expert's first tile slot
    n = tl.load(eoff_ptr + e + 1) - tl.load(eoff_ptr + e)
    j = tl.arange(0, 128)
    a_base = a_ptr + ms[:, None].to(tl.int64) * lda + t0 * 128 + j[None, :]
    b_base = b_ptr + ns[:, None].to(tl.int64) * ldb + t0 * 128 + j[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, (n + 127) // 128):          # addresses from the induction variable, so the loop pipelines
        a = tl.load(a_base + i * 128)            # whole tiles: the producers zero a partial tile's padding
        b = tl.load(b_base + i * 128)
        sa = tl.load(as_ptr + (t0 + i) * MO + ms)
        sb = tl.load(bs_ptr + (t0 + i) * NO + ns)
        acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :],
             acc.to(out_ptr.dtype.element_ty))


# ---- launchers ----------------------------------------------------------------------------------------------------

def _cfg(nk, E, small_ok):
    return SMALL_CFG if small_ok and nk < LARGE_ROWS_PER_EXPERT * E else CFG


def _grid_rows(nk, E, ncols, cfg=CFG):
    """Programs: row tiles x column tiles."""
    return (row_tile_bound(nk, E, cfg["BLOCK_M"]) * (ncols // cfg["BLOCK_N"]),)


def _opts(cfg=CFG):
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def gateup(xq, xs, w, ws, pair, eoff, top_k, out_dtype, save, pow2, counter, cfg=None):
    """x rows (xq [N, H], xs [H/128, N]), W13 (w [E, 2I, H], ws [E, 2I/128, H/128]) -> (ab [NK, 2I] or None,
    h rows (hq [NK, I], hs [I/128, NK]), h cols (hqt [I, slots*128], hst [slots, I]) or None)."""
    E, I2, H = w.shape
    inter = I2 // 2
    nk = pair.numel()
    dev = xq.device
    slots = row_tile_bound(nk, E)
    ab = torch.empty(nk, I2, dtype=out_dtype, device=dev) if save else torch.empty(1, dtype=out_dtype, device=dev)
    hq = torch.empty(nk, inter, dtype=torch.float8_e4m3fn, device=dev)
    hs = torch.empty(inter // TILE, nk, dtype=torch.float32, device=dev)
    hqt = torch.empty(inter, slots * TILE if save else 1, dtype=torch.float8_e4m3fn, device=dev)
    hst = torch.empty(slots if save else 1, inter, dtype=torch.float32, device=dev)
    if nk:
        cfg = cfg or _cfg(nk, E, small_ok=not save)  # SAVE stores 128-row column tiles
        if save and cfg["BLOCK_M"] != TILE:
            raise ValueError(f"gateup with save=True needs {TILE}-row tiles (its column-quantised copies), got "
                             f"BLOCK_M={cfg['BLOCK_M']}")
        _gateup_kernel[_grid_rows(nk, E, inter, cfg)](
            xq, xs, w, ws, pair, eoff, ab, hq, hs, hqt, hst, counter, xq.shape[0], nk, hqt.stride(0), w.stride(0),
            ws.stride(0), I=inter, H=H, TOPK=top_k, E=E, SAVE=save, POW2=pow2, **_opts(cfg))
    return (ab if save else None), (hq, hs), ((hqt, hst) if save else None)


def rows_gemm(aq, as_, b, bs, pair, eoff, top_k, out, a_gather, cfg=None):
    """out[pair] = A_row B_e^T: A (aq [NA, K], as_ [K/128, NA]), B (b [E, NOUT, K], bs [E, NOUT/128, K/128])."""
    E, nout, K = b.shape
    nk = pair.numel()
    if nk:
        cfg = cfg or _cfg(nk, E, small_ok=True)
        _rows_kernel[_grid_rows(nk, E, nout, cfg)](aq, as_, b, bs, pair, eoff, out, aq.shape[0], b.stride(0),
                                                   bs.stride(0), out.stride(0), K=K, NOUT=nout, TOPK=top_k, E=E,
                                                   A_GATHER=a_gather, **_opts(cfg))
    return out


def dswiglu(dq, ds, w2t, w2ts, ab, wt, pair, eoff, top_k, grad_dtype, pow2, counter):
    """dY rows (dq [N, H], ds [H/128, N]), W2^T (w2t [E, I, H], w2ts [E, I/128, H/128]), ab [NK, 2I], wt [N, k]
    or None -> (d(gate|up) rows (gq [NK, 2I], gs [2I/128, NK]), cols (gqt [2I, slots*128], gst [slots, 2I]),
    part [I/128, NK] fp32 or None)."""
    E, inter, H = w2t.shape
    nk = pair.numel()
    dev = dq.device
    slots = row_tile_bound(nk, E)
    gq = torch.empty(nk, 2 * inter, dtype=grad_dtype, device=dev)
    gs = torch.empty(2 * inter // TILE, nk, dtype=torch.float32, device=dev)
    gqt = torch.empty(2 * inter, slots * TILE, dtype=grad_dtype, device=dev)
    gst = torch.empty(slots, 2 * inter, dtype=torch.float32, device=dev)
    part = torch.empty(inter // CFG["BLOCK_N"], nk, dtype=torch.float32, device=dev) if wt is not None else None
    if nk:
        _dswiglu_kernel[_grid_rows(nk, E, inter)](
            dq, ds, w2t, w2ts, ab, wt if wt is not None else gs, pair, eoff, part if part is not None else gs, gq,
            gs, gqt, gst, counter, dq.shape[0], nk, gqt.stride(0), w2t.stride(0), w2ts.stride(0), I=inter, H=H,
            TOPK=top_k, E=E, WEIGHTED=wt is not None, QDT=TL_FP8[grad_dtype], FMAX=FP8_MAX[grad_dtype], POW2=pow2,
            **_opts())
    return (gq, gs), (gqt, gst), part


def wgrad(at, ats, bt, bts, eoff, out):
    """out [E, MO, NO] = per-expert A^T B from FP8 cols (at [MO, slots*128], ats [slots, MO]; bt, bts); the
    dense cols layout [C, Tp] of `quantize` is the one-expert case."""
    E, MO, NO = out.shape
    bm, bn = CFG["BLOCK_M"], CFG["BLOCK_N"]
    _wgrad_kernel[(E * (MO // bm) * (NO // bn),)](at, ats, bt, bts, eoff, out, at.stride(0), bt.stride(0),
                                                  out.stride(0), out.stride(1), MO=MO, NO=NO, E=E, BLOCK_M=bm,
                                                  BLOCK_N=bn, num_warps=CFG["num_warps"],
                                                  num_stages=CFG["num_stages"])
    return out
