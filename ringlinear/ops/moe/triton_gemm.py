"""Grouped GEMMs of the fused MoE over expert-sorted (token, slot) pairs, forward and backward.

Rows are the N*k pairs in expert order (`sorted_pair`, `eoff` from `triton_route.make_plan`). Each GEMM program finds
its expert and row tile on the device from `eoff`, so the grid is a fixed upper bound computed from N on the host:
no host sync, graph-capturable. The K loop of every GEMM runs in a fixed order with fixed block sizes, and the
per-pair outputs are written once and reduced over slots in slot order: results are bitwise repeatable and a row's
value does not depend on the other rows of the batch. The optional atomic combine trades that for fewer bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv, next_pow2
from .triton_route import dot_precision, fit_block

# Block sizes. Few rows per expert (decode, small prefill) stream weights: 64-row tiles. Many rows per expert
# (*_large, from LARGE_ROWS_PER_EXPERT on average) are compute-bound: 128-row tiles. Both tiers keep BLOCK_K = 64
# and BLOCK_M >= 64 (Hopper wgmma, k16 steps in one K order), so an output element is accumulated identically in
# either tier: a row's result does not depend on the batch (benchmarks/moe.py checks rows of 1- and 64-token calls
# bitwise against an 8192-token call).
LARGE_ROWS_PER_EXPERT = 128
GEMM_CFG = {
    "gateup": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    "gateup_large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    "down": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "down_large": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
    "dswiglu": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "dx": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "dx_large": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    "wgrad": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "combine": dict(BLOCK_T=16, BLOCK_H=256, num_warps=4),
}


def gemm_cfg(which, nk, num_experts):
    """The block config of GEMM `which` for nk sorted rows over num_experts experts."""
    large = which + "_large"
    return GEMM_CFG[large] if large in GEMM_CFG and nk >= LARGE_ROWS_PER_EXPERT * num_experts else GEMM_CFG[which]


@triton.jit
def _row_tile(eoff_ptr, NCOLS: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of the expert-sorted rows (row tiles outer, so the n-tiles of one row tile run together
    and share its A rows in L2) -> (expert, rows [BM], row mask, columns [BN], n-tile). expert == E when the
    program is past the last tile (the grid is an upper bound)."""
    NT_N: tl.constexpr = NCOLS // BLOCK_N
    pid = tl.program_id(0)
    t = pid // NT_N
    es = tl.arange(0, E)
    start = tl.load(eoff_ptr + es)
    end = tl.load(eoff_ptr + es + 1)
    ntiles = (end - start + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(ntiles, 0)
    e = tl.sum((cum <= t).to(tl.int32), 0)
    hit = es == e
    row0 = tl.sum(tl.where(hit, start, 0), 0) + (t - tl.sum(tl.where(hit, cum - ntiles, 0), 0)) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < tl.sum(tl.where(hit, end, 0), 0)
    pn = pid % NT_N
    return e, rows, rmask, pn * BLOCK_N + tl.arange(0, BLOCK_N), pn


@triton.jit
def _rows_mma(a_rows, rmask, b_ptr, stride_bn, stride_bk, ns, K: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BM, BN] fp32 = A[rows, :K] @ B[:K, ns]; a_rows [BM] point at each A row's first element (gathered rows
    welcome), B[k, n] = b_ptr[n * stride_bn + k * stride_bk]. One K order for every tile."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows[:, None] + ks[None, :]
    b_ptrs = b_ptr + ns[None, :] * stride_bn + ks[:, None] * stride_bk
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
        acc = tl.dot(a, tl.load(b_ptrs), acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _gateup_kernel(x_ptr, w_ptr, pair_ptr, eoff_ptr, ab_ptr, h_ptr, stride_x, stride_we, stride_wn,
                   TOPK: tl.constexpr, H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, SAVE_AB: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[r] = silu(x[tok] W_gate^T) * (x[tok] W_up^T) for sorted rows r; w13 [E, 2I, H] (gate rows then up rows)."""
    e, rows, rmask, ns, _pn = _row_tile(eoff_ptr, I, E, BLOCK_M, BLOCK_N)
    if e >= E:
        return
    tok = tl.load(pair_ptr + rows, mask=rmask, other=0) // TOPK
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None].to(tl.int64) * stride_x + ks[None, :]
    g_ptrs = w_ptr + e.to(tl.int64) * stride_we + ns[None, :] * stride_wn + ks[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, H, BLOCK_K):
        a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
        acc_g = tl.dot(a, tl.load(g_ptrs), acc_g, input_precision=PREC)
        acc_u = tl.dot(a, tl.load(u_ptrs), acc_u, input_precision=PREC)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dt = h_ptr.dtype.element_ty
    # Gate and up are rounded to the model dtype as the reference's linears are; the backward recomputes the
    # activation from these saved values, so forward and backward see the same numbers.
    g = acc_g.to(dt)
    u = acc_u.to(dt)
    r64 = rows[:, None].to(tl.int64)
    if SAVE_AB:
        tl.store(ab_ptr + r64 * (2 * I) + ns[None, :], g, mask=rmask[:, None])
        tl.store(ab_ptr + r64 * (2 * I) + I + ns[None, :], u, mask=rmask[:, None])
    gf = g.to(tl.float32)
    tl.store(h_ptr + r64 * I + ns[None, :], (gf * tl.sigmoid(gf) * u.to(tl.float32)).to(dt), mask=rmask[:, None])


@triton.jit
def _rows_kernel(a_ptr, b_ptr, out_ptr, pair_ptr, eoff_ptr, wt_ptr, stride_a, stride_be, stride_bn, stride_bk,
                 stride_o, TOPK: tl.constexpr, K: tl.constexpr, NOUT: tl.constexpr, E: tl.constexpr,
                 ATOMIC: tl.constexpr, SCALE: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[pair] = a[r] B_e for sorted rows r (B_e[k, n] = b[e, n*stride_bn + k*stride_bk]). Deterministic: one
    row per pair, written once. ATOMIC: out is [N, NOUT] fp32 and gets (w[pair] *) the row added to its token."""
    e, rows, rmask, ns, _pn = _row_tile(eoff_ptr, NOUT, E, BLOCK_M, BLOCK_N)
    if e >= E:
        return
    acc = _rows_mma(a_ptr + rows.to(tl.int64) * stride_a, rmask, b_ptr + e.to(tl.int64) * stride_be, stride_bn,
                    stride_bk, ns, K, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
    # the expert's output is rounded to the model dtype before any weighting (reference semantics)
    val = acc.to(a_ptr.dtype.element_ty)
    if ATOMIC:
        v = val.to(tl.float32)
        if SCALE:
            v = v * tl.load(wt_ptr + pair, mask=rmask, other=0.0)[:, None]
        tl.atomic_add(out_ptr + (pair // TOPK)[:, None].to(tl.int64) * stride_o + ns[None, :], v,
                      mask=rmask[:, None], sem="relaxed")
    else:
        tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_o + ns[None, :], val, mask=rmask[:, None])


@triton.jit
def _dswiglu_kernel(dy_ptr, w2_ptr, ab_ptr, h_ptr, wt_ptr, dab_ptr, part_ptr, pair_ptr, eoff_ptr, NK, stride_dy,
                    stride_we, stride_wh, TOPK: tl.constexpr, H: tl.constexpr, I: tl.constexpr, E: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """g = dy[tok] W2_e (K = H); dh = w * g; dab = SwiGLU'(ab) dh in sorted rows; part[n-tile, pair] = g . h
    (the partial of d topk_weight = dy . expert output, summed over n-tiles later in a fixed order)."""
    e, rows, rmask, ns, pn = _row_tile(eoff_ptr, I, E, BLOCK_M, BLOCK_N)
    if e >= E:
        return
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
    acc = _rows_mma(dy_ptr + (pair // TOPK).to(tl.int64) * stride_dy, rmask, w2_ptr + e.to(tl.int64) * stride_we, 1,
                    stride_wh, ns, H, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    r64 = rows[:, None].to(tl.int64)
    m2 = rmask[:, None]
    g = tl.load(ab_ptr + r64 * (2 * I) + ns[None, :], mask=m2, other=0.0).to(tl.float32)
    u = tl.load(ab_ptr + r64 * (2 * I) + I + ns[None, :], mask=m2, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + r64 * I + ns[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(part_ptr + pn * NK + pair, tl.sum(acc * h, 1), mask=rmask)
    dh = acc * tl.load(wt_ptr + pair, mask=rmask, other=0.0)[:, None]
    sg = tl.sigmoid(g)
    dt = dab_ptr.dtype.element_ty
    tl.store(dab_ptr + r64 * (2 * I) + ns[None, :], (dh * u * sg * (1.0 + g * (1.0 - sg))).to(dt), mask=m2)
    tl.store(dab_ptr + r64 * (2 * I) + I + ns[None, :], (dh * g * sg).to(dt), mask=m2)


@triton.jit
def _wgrad_kernel(a_ptr, b_ptr, out_ptr, pair_ptr, eoff_ptr, wt_ptr, stride_a, stride_b, stride_oe, stride_om,
                  TOPK: tl.constexpr, MO: tl.constexpr, NO: tl.constexpr, A_GATHER: tl.constexpr,
                  B_GATHER: tl.constexpr, A_SCALE: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = sum over expert e's rows of A_row^T B_row ([MO, NO]); a row of A/B is the sorted row itself or,
    with *_GATHER, its token's row; A_SCALE multiplies A rows by the pair's weight. Rows run in sorted order."""
    NT_M: tl.constexpr = MO // BLOCK_M
    NT_N: tl.constexpr = NO // BLOCK_N
    pid = tl.program_id(0)
    e = pid // (NT_M * NT_N)
    ms = ((pid // NT_N) % NT_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % NT_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(eoff_ptr + e)
    end = tl.load(eoff_ptr + e + 1)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + rk
        rmask = rows < end
        pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
        ar = (pair // TOPK) if A_GATHER else rows
        br = (pair // TOPK) if B_GATHER else rows
        a = tl.load(a_ptr + ar[:, None].to(tl.int64) * stride_a + ms[None, :], mask=rmask[:, None], other=0.0)
        if A_SCALE:
            a = (a.to(tl.float32) * tl.load(wt_ptr + pair, mask=rmask, other=0.0)[:, None]).to(a.dtype)
        b = tl.load(b_ptr + br[:, None].to(tl.int64) * stride_b + ns[None, :], mask=rmask[:, None], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :],
             acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _slot_sum_kernel(src_ptr, wt_ptr, sh_ptr, dst_ptr, part_ptr, dw_ptr, N, NK, TOPK: tl.constexpr,
                     KP2: tl.constexpr, H: tl.constexpr, WEIGHTED: tl.constexpr, HAS_SHARED: tl.constexpr,
                     NPART: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """dst[t] = cast(sum_s (w[t,s] *) src[t*k+s]) in fp32, slot order; then + shared[t] in the model dtype (the
    reference adds the shared expert to the cast routed sum). NPART > 0 (backward): also dw[t, s] = sum over
    n-tiles of part[:, t*k+s], in a fixed order."""
    NT_H: tl.constexpr = H // BLOCK_H
    pid = tl.program_id(0)
    rows = (pid // NT_H) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (pid % NT_H) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < N
    r64 = rows[:, None].to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for s in tl.static_range(TOPK):
        o = tl.load(src_ptr + (r64 * TOPK + s) * H + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        if WEIGHTED:
            o = o * tl.load(wt_ptr + rows * TOPK + s, mask=rmask, other=0.0)[:, None]
        acc += o
    y = acc.to(dst_ptr.dtype.element_ty)
    if HAS_SHARED:
        y = (y.to(tl.float32) + tl.load(sh_ptr + r64 * H + cols[None, :], mask=rmask[:, None],
                                        other=0.0).to(tl.float32)).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + r64 * H + cols[None, :], y, mask=rmask[:, None])
    if NPART > 0 and pid % NT_H == 0:
        kk = tl.arange(0, KP2)
        pairs = rows[:, None] * TOPK + kk[None, :]
        pm = rmask[:, None] & (kk < TOPK)[None, :]
        dw = tl.zeros([BLOCK_T, KP2], tl.float32)
        for j in tl.static_range(NPART):
            dw += tl.load(part_ptr + j * NK + pairs, mask=pm, other=0.0)
        tl.store(dw_ptr + pairs, dw, mask=pm)


# ---- launchers ----------------------------------------------------------------------------------------------------

def _row_tiles(nk, E, block_m):
    """Upper bound on row tiles over all experts: each expert adds at most one partial tile."""
    return max(min(nk, cdiv(nk, block_m) + E), 1)


def _launch_opts(cfg, dtype=None):
    # The stage counts are sized for 16-bit tiles; fp32 tiles are twice as large and would overflow shared memory
    # (seen on H100 with fp32 master weights under autocast). Stages do not change the K order: same numbers.
    stages = cfg["num_stages"]
    if dtype is not None and torch.empty(0, dtype=dtype).element_size() >= 4:
        stages = min(stages, 2)
    return dict(num_warps=cfg["num_warps"], num_stages=stages)


def gateup(x, w13, pair, eoff, top_k, save_ab):
    """x [N, H], w13 [E, 2I, H] -> (h [N*k, I] sorted rows, ab [N*k, 2I] gate|up pre-activations or None)."""
    E, I2, H = w13.shape
    I = I2 // 2
    nk = pair.numel()
    assert w13.stride(2) == 1 and x.stride(1) == 1
    cfg = gemm_cfg("gateup", nk, E)
    bn, bk = fit_block(cfg["BLOCK_N"], I), fit_block(cfg["BLOCK_K"], H)
    h = torch.empty(nk, I, dtype=x.dtype, device=x.device)
    ab = torch.empty(nk, 2 * I, dtype=x.dtype, device=x.device) if save_ab else h
    grid = (_row_tiles(nk, E, cfg["BLOCK_M"]) * (I // bn),)
    _gateup_kernel[grid](x, w13, pair, eoff, ab, h, x.stride(0), w13.stride(0), w13.stride(1), TOPK=top_k, H=H,
                         I=I, E=E, SAVE_AB=save_ab, PREC=dot_precision(x, w13), BLOCK_M=cfg["BLOCK_M"],
                         BLOCK_N=bn, BLOCK_K=bk, **_launch_opts(cfg, x.dtype))
    return h, (ab if save_ab else None)


def rows_gemm(a, b, b_strides, n_out, pair, eoff, top_k, out, wt=None, atomic=False, which="down"):
    """out[pair] = a[sorted row] @ B_e with B_e[k, n] = b[e, n * sn + k * sk], (se, sn, sk) = b_strides.
    atomic: out [N, n_out] fp32 accumulates (wt *) rows per token instead."""
    E = b.shape[0]
    nk, K = a.shape
    cfg = gemm_cfg(which, nk, E)
    bn, bk = fit_block(cfg["BLOCK_N"], n_out), fit_block(cfg["BLOCK_K"], K)
    grid = (_row_tiles(nk, E, cfg["BLOCK_M"]) * (n_out // bn),)
    _rows_kernel[grid](a, b, out, pair, eoff, wt if wt is not None else out, a.stride(0), *b_strides, out.stride(0),
                       TOPK=top_k, K=K, NOUT=n_out, E=E, ATOMIC=atomic, SCALE=wt is not None,
                       PREC=dot_precision(a, b), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, BLOCK_K=bk,
                       **_launch_opts(cfg, a.dtype))
    return out


def dswiglu(dy, w2, ab, h, wt, pair, eoff, top_k):
    """-> (dab [N*k, 2I] sorted rows, part [n-tiles, N*k] fp32 partial d topk_weight)."""
    E, H, I = w2.shape
    nk = pair.numel()
    assert w2.stride(2) == 1
    cfg = gemm_cfg("dswiglu", nk, E)
    bn, bk = fit_block(cfg["BLOCK_N"], I), fit_block(cfg["BLOCK_K"], H)
    dab = torch.empty(nk, 2 * I, dtype=ab.dtype, device=ab.device)
    part = torch.empty(I // bn, nk, dtype=torch.float32, device=ab.device)
    grid = (_row_tiles(nk, E, cfg["BLOCK_M"]) * (I // bn),)
    _dswiglu_kernel[grid](dy, w2, ab, h, wt, dab, part, pair, eoff, nk, dy.stride(0), w2.stride(0), w2.stride(1),
                          TOPK=top_k, H=H, I=I, E=E, PREC=dot_precision(dy, w2), BLOCK_M=cfg["BLOCK_M"],
                          BLOCK_N=bn, BLOCK_K=bk, **_launch_opts(cfg, dy.dtype))
    return dab, part


def wgrad(a, b, out, pair, eoff, top_k, a_gather, b_gather, wt=None):
    """out [E, MO, NO] (written whole, zeros for experts without rows) = per-expert A^T B over its rows."""
    E, MO, NO = out.shape
    cfg = GEMM_CFG["wgrad"]
    bm, bn = fit_block(cfg["BLOCK_M"], MO), fit_block(cfg["BLOCK_N"], NO)
    grid = (E * (MO // bm) * (NO // bn),)
    _wgrad_kernel[grid](a, b, out, pair, eoff, wt if wt is not None else out, a.stride(0), b.stride(0),
                        out.stride(0), out.stride(1), TOPK=top_k, MO=MO, NO=NO, A_GATHER=a_gather,
                        B_GATHER=b_gather, A_SCALE=wt is not None, PREC=dot_precision(a, b), BLOCK_M=bm,
                        BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], **_launch_opts(cfg, a.dtype))
    return out


def _slot_sum(src, N, k, out_dtype, wt=None, shared=None, part=None):
    H = src.shape[1]
    cfg = GEMM_CFG["combine"]
    bh = fit_block(cfg["BLOCK_H"], H)
    dst = torch.empty(N, H, dtype=out_dtype, device=src.device)
    dw = torch.empty(N, k, dtype=torch.float32, device=src.device) if part is not None else None
    grid = (cdiv(N, cfg["BLOCK_T"]) * (H // bh),)
    _slot_sum_kernel[grid](src, wt if wt is not None else src, shared if shared is not None else dst, dst,
                           part if part is not None else dst, dw if dw is not None else dst, N, N * k, TOPK=k,
                           KP2=next_pow2(k), H=H, WEIGHTED=wt is not None,
                           HAS_SHARED=shared is not None, NPART=part.shape[0] if part is not None else 0,
                           BLOCK_T=cfg["BLOCK_T"], BLOCK_H=bh, num_warps=cfg["num_warps"])
    return dst, dw


def combine(o, wt, shared, out_dtype):
    """o [N*k, H] per-pair outputs, wt [N, k] fp32, shared [N, H] or None -> y [N, H]."""
    return _slot_sum(o, wt.shape[0], wt.shape[1], out_dtype, wt=wt, shared=shared)[0]


def combine_bwd(dxp, part, N, k, dx_dtype):
    """dxp [N*k, H], part [P, N*k] -> (dx [N, H], d topk_weight [N, k] fp32)."""
    return _slot_sum(dxp, N, k, dx_dtype, part=part)
