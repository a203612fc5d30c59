"""Fused Triton norms with their backward: the linear-attention output path GroupRMSNorm(o) * sigmoid(gate), and
QK RMSNorm + partial NeoX RoPE. Same signatures and rounding points as `reference.py` (statistics in fp32, cast
to the input dtype where the reference casts). Weight gradients are reduced deterministically: each program of a
fixed-size grid sums its rows in order into its own fp32 row, and those rows are summed afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import call
from .._triton import cdiv, next_pow2, num_sms, patch_interpreter

patch_interpreter()

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _grid_programs(x: torch.Tensor, blocks: int) -> int:
    sms = num_sms(x.device)
    return max(1, min(blocks, 2 * sms if sms else 4))


def _check_dtype(*xs):
    for x in xs:
        if x.dtype not in _TL:
            raise ValueError(f"Triton norms take fp32/bf16/fp16 tensors, got {x.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# Group RMSNorm x sigmoid(gate)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _grn_fwd_kernel(o, gate, w, y, rstd_out, M, C, CG, eps, so, sg,
                    BM: tl.constexpr, BC: tl.constexpr, DT: tl.constexpr, OUT_DT: tl.constexpr):
    """One program per (row block, group): y = (w * rmsnorm(o).to(DT)).to(OUT) * sigmoid(gate.to(DT)).to(DT)."""
    i_m = tl.program_id(0)
    i_g = tl.program_id(1)
    rm = i_m * BM + tl.arange(0, BM)
    rc = tl.arange(0, BC)
    mm = rm < M
    mc = rc < CG
    msk = mm[:, None] & mc[None, :]
    col = i_g * CG + rc
    rows = rm.to(tl.int64)
    x = tl.load(o + rows[:, None] * so + col[None, :], mask=msk, other=0.0).to(tl.float32)
    gt = tl.load(gate + rows[:, None] * sg + col[None, :], mask=msk, other=0.0).to(DT).to(tl.float32)
    wt = tl.load(w + col, mask=mc, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / CG + eps)
    n = (x * rstd[:, None]).to(DT).to(tl.float32)
    y1 = (wt[None, :] * n).to(OUT_DT).to(tl.float32)
    s = tl.sigmoid(gt).to(DT).to(tl.float32)
    tl.store(y + rows[:, None] * C + col[None, :], (y1 * s).to(OUT_DT), mask=msk)
    tl.store(rstd_out + rows * (C // CG) + i_g, rstd, mask=mm)


@triton.jit
def _grn_bwd_kernel(dy, o, gate, w, rstd_in, do, dgate, dw_part, M, C, CG, so, sg, n_blocks,
                    BM: tl.constexpr, BC: tl.constexpr, DT: tl.constexpr):
    """Fixed grid (P, G): program p walks row blocks p, p+P, ... of group g, accumulating its dw row in order."""
    pid = tl.program_id(0)
    i_g = tl.program_id(1)
    P = tl.num_programs(0)
    rc = tl.arange(0, BC)
    mc = rc < CG
    col = i_g * CG + rc
    wt = tl.load(w + col, mask=mc, other=0.0).to(tl.float32)
    acc = tl.zeros([BC], dtype=tl.float32)
    for blk in range(pid, n_blocks, P):
        rm = blk * BM + tl.arange(0, BM)
        mm = rm < M
        msk = mm[:, None] & mc[None, :]
        rows = rm.to(tl.int64)
        x = tl.load(o + rows[:, None] * so + col[None, :], mask=msk, other=0.0).to(tl.float32)
        gt = tl.load(gate + rows[:, None] * sg + col[None, :], mask=msk, other=0.0).to(DT).to(tl.float32)
        g_dy = tl.load(dy + rows[:, None] * C + col[None, :], mask=msk, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_in + rows * (C // CG) + i_g, mask=mm, other=0.0)
        nh = x * rstd[:, None]
        s = tl.sigmoid(gt)
        acc += tl.sum(g_dy * nh * s, axis=0)
        tl.store(dgate + rows[:, None] * C + col[None, :],
                 (g_dy * wt[None, :] * nh * s * (1.0 - s)).to(dgate.dtype.element_ty), mask=msk)
        dn = g_dy * wt[None, :] * s
        dx = rstd[:, None] * (dn - nh * (tl.sum(dn * nh, axis=1) / CG)[:, None])
        tl.store(do + rows[:, None] * C + col[None, :], dx.to(do.dtype.element_ty), mask=msk)
    tl.store(dw_part + pid.to(tl.int64) * C + col, acc, mask=mc)


def _rows(x: torch.Tensor, C: int) -> tuple[torch.Tensor, int]:
    """[..., C] -> ([M, C] view with unit column stride, row stride)."""
    x2 = x.reshape(-1, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, x2.stride(0)


def _grn_block(CG: int) -> tuple[int, int]:
    bc = next_pow2(CG)
    return bc, max(1, min(64, 8192 // bc))


class _GroupRMSNormGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, weight, gate, num_groups, eps):
        C = o.shape[-1]
        if C % num_groups or weight.shape != (C,) or gate.shape != o.shape:
            raise ValueError(f"group_rms_norm_gate: o {tuple(o.shape)}, gate {tuple(gate.shape)}, weight "
                             f"{tuple(weight.shape)}, groups {num_groups}")
        _check_dtype(o, weight, gate)
        CG = C // num_groups
        out_dt = torch.promote_types(weight.dtype, o.dtype)
        o2, so = _rows(o, C)
        g2, sg = _rows(gate, C)
        M = o2.shape[0]
        y = torch.empty(M, C, device=o.device, dtype=out_dt)
        rstd = torch.empty(M, num_groups, device=o.device, dtype=torch.float32)
        bc, bm = _grn_block(CG)
        _grn_fwd_kernel[(cdiv(M, bm), num_groups)](
            o2, g2, weight, y, rstd, M, C, CG, eps, so, sg, BM=bm, BC=bc, DT=_TL[o.dtype], OUT_DT=_TL[out_dt],
            num_warps=4)
        ctx.save_for_backward(o2, g2, weight, rstd)
        ctx.meta = (o.shape, gate.dtype, num_groups)
        return y.reshape(o.shape)

    @staticmethod
    def backward(ctx, dy):
        o2, g2, weight, rstd = ctx.saved_tensors
        shape, gate_dt, G = ctx.meta
        M, C = o2.shape
        CG = C // G
        dy2 = dy.reshape(M, C).contiguous()
        bc, bm = _grn_block(CG)
        nb = cdiv(M, bm)
        P = _grid_programs(o2, nb)
        do = torch.empty(M, C, device=o2.device, dtype=o2.dtype)
        dgate = torch.empty(M, C, device=o2.device, dtype=gate_dt)
        part = torch.empty(P, C, device=o2.device, dtype=torch.float32)
        _grn_bwd_kernel[(P, G)](dy2, o2, g2, weight, rstd, do, dgate, part, M, C, CG, o2.stride(0), g2.stride(0), nb,
                                BM=bm, BC=bc, DT=_TL[o2.dtype], num_warps=4)
        return do.reshape(shape), part.sum(0).to(weight.dtype), dgate.reshape(shape), None, None


def group_rms_norm_gate(o, weight, gate, num_groups, eps):
    """GroupRMSNorm(o) * sigmoid(gate); o, gate [..., C], weight [C]. Returns [..., C]."""
    return call(_GroupRMSNormGate, o, weight, gate, int(num_groups), float(eps))


# ----------------------------------------------------------------------------------------------------------------
# QK RMSNorm + partial NeoX RoPE
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _rope_parts(x, sx, rows, mr, HALF, D, BH: tl.constexpr, BR: tl.constexpr):
    """Load one row tile [BM, *] of x in three parts: rotated halves x1 [0, HALF), x2 [HALF, 2 HALF), rest."""
    rh = tl.arange(0, BH)
    rr = tl.arange(0, BR)
    mh = mr[:, None] & (rh < HALF)[None, :]
    mrest = mr[:, None] & (rr < D - 2 * HALF)[None, :]
    base = x + rows[:, None] * sx
    x1 = tl.load(base + rh[None, :], mask=mh, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + rh[None, :], mask=mh, other=0.0).to(tl.float32)
    x3 = tl.load(base + 2 * HALF + rr[None, :], mask=mrest, other=0.0).to(tl.float32)
    return x1, x2, x3, mh, mrest


@triton.jit
def _qkr_fwd_kernel(x, w, cos, sin, y, M, H, T, sx_t, sx_h, HALF, D, eps,
                    BM: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr):
    """Rows are (token, head) pairs; row r reads x[r // H, r % H, :] through strides and writes y contiguously."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    mr = rm < M
    tok = (rm // H).to(tl.int64)
    xrow = tok * sx_t + (rm % H) * sx_h
    # the row "stride" trick: pass 1 as stride and the full offset as rows
    x1, x2, x3, mh, mrest = _rope_parts(x, 1, xrow, mr, HALF, D, BH, BR)
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1) + tl.sum(x3 * x3, 1)) / D + eps)
    rh = tl.arange(0, BH)
    rr = tl.arange(0, BR)
    w1 = tl.load(w + rh, mask=rh < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w + HALF + rh, mask=rh < HALF, other=0.0).to(tl.float32)
    w3 = tl.load(w + 2 * HALF + rr, mask=rr < D - 2 * HALF, other=0.0).to(tl.float32)
    y1 = (x1 * rstd[:, None]) * w1[None, :]
    y2 = (x2 * rstd[:, None]) * w2[None, :]
    y3 = (x3 * rstd[:, None]) * w3[None, :]
    t = tok % T
    c = tl.load(cos + t[:, None] * HALF + rh[None, :], mask=mh, other=0.0)
    s = tl.load(sin + t[:, None] * HALF + rh[None, :], mask=mh, other=0.0)
    yb = y + rm.to(tl.int64)[:, None] * D
    odt = y.dtype.element_ty
    tl.store(yb + rh[None, :], (y1 * c - y2 * s).to(odt), mask=mh)
    tl.store(yb + HALF + rh[None, :], (y2 * c + y1 * s).to(odt), mask=mh)
    tl.store(yb + 2 * HALF + rr[None, :], y3.to(odt), mask=mrest)


@triton.jit
def _qkr_bwd_kernel(dy, x, w, cos, sin, dx, dw_part, M, H, T, sx_t, sx_h, HALF, D, eps, n_blocks,
                    BM: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    rh = tl.arange(0, BH)
    rr = tl.arange(0, BR)
    w1 = tl.load(w + rh, mask=rh < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w + HALF + rh, mask=rh < HALF, other=0.0).to(tl.float32)
    w3 = tl.load(w + 2 * HALF + rr, mask=rr < D - 2 * HALF, other=0.0).to(tl.float32)
    a1 = tl.zeros([BH], dtype=tl.float32)
    a2 = tl.zeros([BH], dtype=tl.float32)
    a3 = tl.zeros([BR], dtype=tl.float32)
    for blk in range(pid, n_blocks, P):
        rm = blk * BM + tl.arange(0, BM)
        mr = rm < M
        tok = (rm // H).to(tl.int64)
        x1, x2, x3, mh, mrest = _rope_parts(x, 1, tok * sx_t + (rm % H) * sx_h, mr, HALF, D, BH, BR)
        rows = rm.to(tl.int64)
        d1, d2, d3, _, _ = _rope_parts(dy, D, rows, mr, HALF, D, BH, BR)
        t = tok % T
        c = tl.load(cos + t[:, None] * HALF + rh[None, :], mask=mh, other=0.0)
        s = tl.load(sin + t[:, None] * HALF + rh[None, :], mask=mh, other=0.0)
        # RoPE is a rotation: its transpose rotates the gradient back.
        g1 = d1 * c + d2 * s
        g2 = d2 * c - d1 * s
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1) + tl.sum(x3 * x3, 1)) / D + eps)
        n1 = x1 * rstd[:, None]
        n2 = x2 * rstd[:, None]
        n3 = x3 * rstd[:, None]
        a1 += tl.sum(g1 * n1, 0)
        a2 += tl.sum(g2 * n2, 0)
        a3 += tl.sum(d3 * n3, 0)
        e1 = g1 * w1[None, :]
        e2 = g2 * w2[None, :]
        e3 = d3 * w3[None, :]
        dot = (tl.sum(e1 * n1, 1) + tl.sum(e2 * n2, 1) + tl.sum(e3 * n3, 1)) / D
        xb = dx + rows[:, None] * D
        odt = dx.dtype.element_ty
        tl.store(xb + rh[None, :], (rstd[:, None] * (e1 - n1 * dot[:, None])).to(odt), mask=mh)
        tl.store(xb + HALF + rh[None, :], (rstd[:, None] * (e2 - n2 * dot[:, None])).to(odt), mask=mh)
        tl.store(xb + 2 * HALF + rr[None, :], (rstd[:, None] * (e3 - n3 * dot[:, None])).to(odt), mask=mrest)
    pb = dw_part + pid.to(tl.int64) * D
    tl.store(pb + rh, a1, mask=rh < HALF)
    tl.store(pb + HALF + rh, a2, mask=rh < HALF)
    tl.store(pb + 2 * HALF + rr, a3, mask=rr < D - 2 * HALF)


def _qkr_layout(x: torch.Tensor):
    """x [..., T, H, D] -> (tensor whose rows (token, head) are reachable by token/head strides, strides)."""
    T, H, D = x.shape[-3:]
    x3 = x.reshape(-1, H, D)  # a view whenever leading dims merge (true for slices of a fused qkv output)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    return x3, x3.stride(0), x3.stride(1)


def _qkr_blocks(HALF: int, D: int):
    bh = next_pow2(max(HALF, 1))
    br = next_pow2(max(D - 2 * HALF, 1))
    return bh, br, max(1, min(64, 4096 // D))


def _qkr_fwd(x, w, cos, sin, eps):
    T, H, D = x.shape[-3:]
    HALF = cos.shape[-1]
    x3, st, sh = _qkr_layout(x)
    M = x3.shape[0] * H
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    bh, br, bm = _qkr_blocks(HALF, D)
    _qkr_fwd_kernel[(cdiv(M, bm),)](x3, w, cos, sin, y, M, H, T, st, sh, HALF, D, eps,
                                           BM=bm, BH=bh, BR=br, num_warps=4)
    return y


def _qkr_bwd(dy, x, w, cos, sin, eps):
    T, H, D = x.shape[-3:]
    HALF = cos.shape[-1]
    x3, st, sh = _qkr_layout(x)
    M = x3.shape[0] * H
    bh, br, bm = _qkr_blocks(HALF, D)
    nb = cdiv(M, bm)
    P = _grid_programs(x, nb)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    part = torch.empty(P, D, device=x.device, dtype=torch.float32)
    _qkr_bwd_kernel[(P,)](dy.contiguous(), x3, w, cos, sin, dx, part, M, H, T, st, sh, HALF, D, eps, nb,
                          BM=bm, BH=bh, BR=br, num_warps=4)
    return dx, part.sum(0).to(w.dtype)


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, cos, sin, eps):
        _check_dtype(q, k, q_weight, k_weight)
        T, D = q.shape[-3], q.shape[-1]
        if k.shape[-3] != T or k.shape[-1] != D or cos.shape != sin.shape or cos.shape[0] != T \
                or 2 * cos.shape[-1] > D:
            raise ValueError(f"qk_norm_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}")
        cos = cos.to(device=q.device, dtype=torch.float32).contiguous()
        sin = sin.to(device=q.device, dtype=torch.float32).contiguous()
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
        ctx.eps = eps
        return _qkr_fwd(q, q_weight, cos, sin, eps), _qkr_fwd(k, k_weight, cos, sin, eps)

    @staticmethod
    def backward(ctx, dq, dk):
        q, k, qw, kw, cos, sin = ctx.saved_tensors
        gq = gk = gqw = gkw = None
        if dq is not None:
            gq, gqw = _qkr_bwd(dq, q, qw, cos, sin, ctx.eps)
        if dk is not None:
            gk, gkw = _qkr_bwd(dk, k, kw, cos, sin, ctx.eps)
        return gq, gk, gqw, gkw, None, None, None


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    """Per-head RMSNorm of q [..., T, Hq, D] and k [..., T, Hk, D], then NeoX RoPE on the first 2*cos.shape[-1]
    dims (cos/sin [T, R/2] fp32). Returns new contiguous q, k in their input dtypes."""
    return call(_QKNormRope, q, k, q_weight, k_weight, cos, sin, float(eps))
