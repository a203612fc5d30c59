"""RMSNorm on Triton, forward and backward: one pass over x where PyTorch's eager form launches six kernels
(cast, pow, mean, rsqrt, mul, cast) and keeps their fp32 intermediates for autograd.

Same rounding points as `reference.rms_norm`: variance in fp32, the normalised row cast to x's dtype, then times the
weight in the promoted dtype. Every row is one program with the whole row in registers, reduced in a fixed order,
so a row's output never depends on how many rows share the call (batch invariance, numerics.md). The weight
gradient is reduced deterministically: a fixed grid of programs, each summing its rows in order into its own fp32
partial row; the partials are summed afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import call
from .._triton import cdiv, next_pow2, patch_interpreter
from .triton import _TL, _check_dtype, _grid_programs

patch_interpreter()


@triton.jit
def _rms_fwd_kernel(x, w, y, rstd_out, M, C, eps, sx, BM: tl.constexpr, BC: tl.constexpr, DT: tl.constexpr,
                    OUT_DT: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rc = tl.arange(0, BC)
    mm = rm < M
    mc = rc < C
    msk = mm[:, None] & mc[None, :]
    rows = rm.to(tl.int64)
    xf = tl.load(x + rows[:, None] * sx + rc[None, :], mask=msk, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / C + eps)
    n = (xf * rstd[:, None]).to(DT).to(tl.float32)
    wt = tl.load(w + rc, mask=mc, other=0.0).to(tl.float32)
    tl.store(y + rows[:, None] * C + rc[None, :], (wt[None, :] * n).to(OUT_DT), mask=msk)
    tl.store(rstd_out + rows, rstd, mask=mm)


@triton.jit
def _rms_bwd_kernel(dy, x, w, rstd_in, dx, dw_part, M, C, sx, n_blocks, BM: tl.constexpr, BC: tl.constexpr):
    """Program p walks row blocks p, p+P, ...: dx = rstd (dn - n mean(dn n)), dn = dy w; its dw partial in order."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    rc = tl.arange(0, BC)
    mc = rc < C
    wt = tl.load(w + rc, mask=mc, other=0.0).to(tl.float32)
    acc = tl.zeros([BC], dtype=tl.float32)
    for blk in range(pid, n_blocks, P):
        rm = blk * BM + tl.arange(0, BM)
        mm = rm < M
        msk = mm[:, None] & mc[None, :]
        rows = rm.to(tl.int64)
        xf = tl.load(x + rows[:, None] * sx + rc[None, :], mask=msk, other=0.0).to(tl.float32)
        g = tl.load(dy + rows[:, None] * C + rc[None, :], mask=msk, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_in + rows, mask=mm, other=0.0)
        n = xf * rstd[:, None]
        acc += tl.sum(g * n, axis=0)
        dn = g * wt[None, :]
        d = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / C)[:, None])
        tl.store(dx + rows[:, None] * C + rc[None, :], d.to(dx.dtype.element_ty), mask=msk)
    tl.store(dw_part + pid.to(tl.int64) * C + rc, acc, mask=mc)


def _blocks(C: int) -> tuple[int, int]:
    bc = next_pow2(C)
    return bc, max(1, min(16, 4096 // bc))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        C = x.shape[-1]
        if weight.shape != (C,):
            raise ValueError(f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
        _check_dtype(x, weight)
        x2 = x.reshape(-1, C)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        out_dt = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(M, C, device=x.device, dtype=out_dt)
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        bc, bm = _blocks(C)
        if M:
            _rms_fwd_kernel[(cdiv(M, bm),)](x2, weight, y, rstd, M, C, eps, x2.stride(0), BM=bm, BC=bc,
                                                   DT=_TL[x.dtype], OUT_DT=_TL[out_dt], num_warps=4)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, C = x2.shape
        bc, bm = _blocks(C)
        nb = cdiv(M, bm)
        P = _grid_programs(x2, nb)
        dx = torch.empty(M, C, device=x2.device, dtype=x2.dtype)
        part = torch.empty(P, C, device=x2.device, dtype=torch.float32)
        if M:
            _rms_bwd_kernel[(P,)](dy.reshape(M, C).contiguous(), x2, weight, rstd, dx, part, M, C, x2.stride(0), nb,
                                  BM=bm, BC=bc, num_warps=4)
        else:
            part.zero_()
        return dx.view(ctx.shape), part.sum(0).to(weight.dtype), None


def rms_norm(x, weight, eps):
    """x [..., C], weight [C] -> weight * (x / rms(x)) (same contract as reference.rms_norm)."""
    return call(_RMSNorm, x, weight, float(eps))
