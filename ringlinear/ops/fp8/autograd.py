"""Differentiable FP8 layers on the Triton kernels: RMSNorm -> FP8, linear, dense SwiGLU MLP, routed experts.

What is saved for backward is FP8: a linear keeps X^T (1x128 along tokens) for its weight gradient, never X; an
MLP keeps X^T, gate/up (model dtype, for SwiGLU') and h^T; the experts keep x (already held by the router), the
gate/up values and h^T. Weights come from the per-step cache (`weights.py`) in both orientations.

Producers hand FP8 copies to consumers by attaching them to the tensor they return (`Fp8Act` on `t._fp8`): an
FP8 consumer uses them instead of quantising again, any other consumer sees an ordinary tensor. The copies are
trusted only while the tensor's version counter is unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..moe import triton_gemm as moe_gemm
from . import torch_mm
from . import triton_gemm as G
from .precision import nonfinite_counter
from .reference import E4M3
from .triton_quant import quantize, quantize_sorted_cols, rms_norm_quant
from .weights import fp8_gateup, fp8_weight

# Dense GEMM implementation per kind. "auto": cuBLAS's blockwise FP8 GEMM (torch scaled_mm) on Hopper where the
# shapes meet its constraints, our Triton kernel elsewhere. H200, benchmarks/fp8.py (2026-12-01): cuBLAS ran
# 1.2-1.7x bf16 torch.matmul at every Ring-mini / Ring-flash projection shape (fprop, dgrad and wgrad), our Triton
# kernel 0.4-0.96x. Both are deterministic at a fixed shape; only Triton is batch invariant by construction.
# RINGLINEAR_FP8_GEMM=triton|torch|auto overrides every kind.
GEMM_BACKEND = {"fprop": "auto", "dgrad": "auto", "wgrad": "auto"}


def _gemm_backend(kind, device, fits):
    b = os.environ.get("RINGLINEAR_FP8_GEMM", "").strip().lower() or GEMM_BACKEND[kind]
    if b not in ("auto", "triton", "torch"):
        raise ValueError(f"RINGLINEAR_FP8_GEMM={b!r}: expected auto, triton or torch")
    if b == "auto":
        return "torch" if fits and torch_mm.available(device) else "triton"
    return b


@dataclass
class Fp8Act:
    """FP8 copies of an activation x [T, C]: rows (q [T, C], s [C/128, T]) and optionally cols (qT [C, Tp],
    sT [Tp/128, C], Tp = T rounded up to 128), made with `pow2` scales from x at version `version`."""
    rows: tuple
    cols: tuple | None
    pow2: bool
    version: int


def attached(x, recipe):
    a = getattr(x, "_fp8", None)
    if a is None or a.version != x._version or a.pow2 != recipe.pow2_scales or a.rows[0].numel() != x.numel():
        return None
    return a


def _act(x2, act, recipe, want_cols):
    """FP8 rows (and cols if wanted) of x2 [T, C]: the attached copies, completed with one quantising pass."""
    pow2, cnt = recipe.pow2_scales, nonfinite_counter(x2.device)
    rows = act.rows if act is not None else None
    cols = act.cols if act is not None else None
    need_cols = want_cols and cols is None
    if rows is None or need_cols:
        r, c = quantize(x2, E4M3, pow2, cnt, rows=rows is None, cols=need_cols)
        rows, cols = rows or r, cols or c
    return rows, cols


class _RmsNormFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, recipe, want_cols, out):
        y, rows, cols, rstd = rms_norm_quant(x, weight, eps, recipe.pow2_scales, nonfinite_counter(x.device),
                                             write_y=True, cols=want_cols)
        out["rows"], out["cols"] = rows, cols
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        # y = w * (x r).to(x.dtype), r = rsqrt(mean(x^2) + eps): casts pass gradients through unchanged
        x, w, rstd = ctx.saved_tensors
        xf, r = x.float(), rstd[:, None]
        dyf = dy.float()
        dn = dyf * w.float()
        dx = r * (dn - xf * (r * r) * (dn * xf).mean(-1, keepdim=True))
        dw = (dyf * (xf * r).to(x.dtype).float()).sum(0)
        return dx.to(x.dtype), dw.to(w.dtype), None, None, None, None


def rms_norm_fp8(x2, weight, eps, recipe):
    """x2 [T, C] -> y [T, C] (= reference.rms_norm) carrying its FP8 rows (and cols when grads are on)."""
    out = {}
    y = _RmsNormFp8.apply(x2, weight, float(eps), recipe, torch.is_grad_enabled(), out)
    y._fp8 = Fp8Act(out["rows"], out["cols"], recipe.pow2_scales, y._version)
    return y


def _dense_rows(aq, as_, b, bs, out_dtype, kind, torch_fn):
    """[T, NOUT] = A rows x B^T for a dense layer (b [NOUT, K]), on Triton or cuBLAS (GEMM_BACKEND)."""
    if _gemm_backend(kind, aq.device, torch_mm.fits(kind, bs, aq.shape[0])) == "torch":
        return torch_fn()
    pair, eoff = G.identity_plan(aq.shape[0], aq.device)
    out = torch.empty(aq.shape[0], b.shape[0], dtype=out_dtype, device=aq.device)
    return G.rows_gemm(aq, as_, b.unsqueeze(0), bs.unsqueeze(0), pair, eoff, 1, out, a_gather=False)


def _dense_wgrad(at, ats, bt, bts, T):
    """dW [MO, NO] fp32 from FP8 cols over T tokens (at [MO, Tp], bt [NO, Tp], zero past T)."""
    if _gemm_backend("wgrad", at.device, torch_mm.fits("wgrad", at)) == "torch":
        return torch_mm.wgrad(at, ats, bt, bts, torch.float32)
    out = torch.empty(1, at.shape[0], bt.shape[0], dtype=torch.float32, device=at.device)
    return G.wgrad(at, ats, bt, bts, G.dense_eoff(T, at.device), out)[0]


class _LinearFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, act, recipe, out_dtype):
        need_w = ctx.needs_input_grad[1]
        (xq, xs), cols = _act(x, act, recipe, want_cols=need_w)
        wq, ws, wqt, wst = fp8_weight(weight, recipe.pow2_scales)
        ydt = torch.float32 if bias is not None else out_dtype
        y = _dense_rows(xq, xs, wq, ws, ydt, "fprop", lambda: torch_mm.fprop(xq, xs, wq, ws, ydt))
        if bias is not None:
            y = (y + bias.float()).to(out_dtype)
        ctx.save_for_backward(*(cols if need_w else (None, None)))
        ctx.wt = (wqt, wst)
        ctx.recipe, ctx.x_dtype, ctx.w_dtype, ctx.has_bias = recipe, x.dtype, weight.dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xt, xts = ctx.saved_tensors
        wqt, wst = ctx.wt
        r = ctx.recipe
        dy = dy.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows, cols = quantize(dy, r.grad_dtype, r.pow2_scales, nonfinite_counter(dy.device), rows=need_x,
                              cols=need_w)
        dx = dw = None
        if need_x:
            dq, ds = rows
            xdt = ctx.x_dtype
            dx = _dense_rows(dq, ds, wqt, wst, xdt, "dgrad", lambda: torch_mm.dgrad(dq, ds, wqt, wst, xdt))
        if need_w:
            dw = _dense_wgrad(*cols, xt, xts, dy.shape[0]).to(ctx.w_dtype)
        db = dy.float().sum(0).to(ctx.w_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


def linear_fp8(x2, weight, bias, recipe, out_dtype, act=None):
    return _LinearFp8.apply(x2, weight, bias, act, recipe, out_dtype)


class _MlpFp8(torch.autograd.Function):
    """Dense SwiGLU MLP: the one-expert case of the grouped kernels (identity plan)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, act, recipe, out_dtype):
        T, H = x.shape
        pow2, cnt = recipe.pow2_scales, nonfinite_counter(x.device)
        need_grad = any(ctx.needs_input_grad[:4])
        (xq, xs), xcols = _act(x, act, recipe, want_cols=ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        w13 = fp8_gateup(w_gate, w_up, pow2)
        w2 = fp8_weight(w_down, pow2)
        pair, eoff = G.identity_plan(T, x.device)
        ab, (hq, hs), hcols = G.gateup(xq, xs, w13[0], w13[1], pair, eoff, 1, out_dtype, need_grad, pow2, cnt)
        y = torch.empty(T, H, dtype=out_dtype, device=x.device)
        G.rows_gemm(hq, hs, w2[0].unsqueeze(0), w2[1].unsqueeze(0), pair, eoff, 1, y, a_gather=False)
        ctx.save_for_backward(ab, *(hcols or (None, None)), *(xcols or (None, None)), pair, eoff)
        ctx.w13t, ctx.w2t = (w13[2], w13[3]), (w2[2].unsqueeze(0), w2[3].unsqueeze(0))
        ctx.recipe, ctx.dtypes = recipe, (x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        ab, hqt, hst, xqt, xqts, pair, eoff = ctx.saved_tensors
        r = ctx.recipe
        cnt = nonfinite_counter(dy.device)
        dy = dy.contiguous()
        inter = ab.shape[1] // 2
        need = ctx.needs_input_grad
        (dq, ds), dcols = quantize(dy, r.grad_dtype, r.pow2_scales, cnt, rows=True, cols=need[3])
        (gq, gs), (gqt, gst), _ = G.dswiglu(dq, ds, *ctx.w2t, ab, None, pair, eoff, 1, r.grad_dtype,
                                            r.pow2_scales, cnt)
        dx = dwg = dwu = dwd = None
        if need[0]:
            dx = torch.empty(dy.shape, dtype=ctx.dtypes[0], device=dy.device)
            G.rows_gemm(gq, gs, *ctx.w13t, pair, eoff, 1, dx, a_gather=False)
        if need[3]:
            dwd = G.wgrad(*dcols, hqt, hst, eoff, torch.empty(1, dy.shape[1], inter, dtype=torch.float32,
                                                              device=dy.device))[0].to(ctx.dtypes[3])
        if need[1] or need[2]:
            dw13 = G.wgrad(gqt, gst, xqt, xqts, eoff, torch.empty(1, 2 * inter, dy.shape[1], dtype=torch.float32,
                                                                  device=dy.device))[0]
            dwg, dwu = dw13[:inter].to(ctx.dtypes[1]), dw13[inter:].to(ctx.dtypes[2])
        return dx, dwg, dwu, dwd, None, None, None


def swiglu_mlp_fp8(x2, w_gate, w_up, w_down, recipe, out_dtype, act=None):
    return _MlpFp8.apply(x2, w_gate, w_up, w_down, act, recipe, out_dtype)


class _ExpertsFp8(torch.autograd.Function):
    """Routed experts over the fused MoE's plan; same semantics as ops.moe.triton._ExpertsFn (deterministic)."""

    @staticmethod
    def forward(ctx, x, wt, w13, w2, shared_out, pair, eoff, top_k, act, recipe, out_dtype):
        N, H = x.shape
        pow2, cnt = recipe.pow2_scales, nonfinite_counter(x.device)
        need_grad = any(ctx.needs_input_grad[:4])
        (xq, xs), _ = _act(x, act, recipe, want_cols=False)
        w13c, w2c = fp8_weight(w13, pow2), fp8_weight(w2, pow2)
        ab, (hq, hs), hcols = G.gateup(xq, xs, w13c[0], w13c[1], pair, eoff, top_k, out_dtype, need_grad, pow2,
                                       cnt)
        o = torch.empty(N * top_k, H, dtype=out_dtype, device=x.device)
        G.rows_gemm(hq, hs, w2c[0], w2c[1], pair, eoff, top_k, o, a_gather=False)
        y = moe_gemm.combine(o, wt, shared_out, out_dtype)
        ctx.save_for_backward(x, wt, pair, eoff, ab, *(hcols or (None, None)))
        ctx.w13t, ctx.w2t = (w13c[2], w13c[3]), (w2c[2], w2c[3])
        ctx.top_k, ctx.recipe, ctx.has_shared = top_k, recipe, shared_out is not None
        ctx.w_dtypes = (w13.dtype, w2.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wt, pair, eoff, ab, hqt, hst = ctx.saved_tensors
        k, r = ctx.top_k, ctx.recipe
        N, H = x.shape
        gdt, pow2, cnt = r.grad_dtype, r.pow2_scales, nonfinite_counter(dy.device)
        dy = dy.contiguous()
        need = ctx.needs_input_grad
        (dq, ds), _ = quantize(dy, gdt, pow2, cnt, rows=True)
        (gq, gs), (gqt, gst), part = G.dswiglu(dq, ds, *ctx.w2t, ab, wt, pair, eoff, k, gdt, pow2, cnt)
        dxp = torch.empty(N * k, H, dtype=ab.dtype, device=x.device)
        G.rows_gemm(gq, gs, *ctx.w13t, pair, eoff, k, dxp, a_gather=False)
        dx, dwt = moe_gemm.combine_bwd(dxp, part, N, k, x.dtype)
        dw13 = dw2 = None
        E = eoff.numel() - 1
        inter = ab.shape[1] // 2
        if need[3]:
            at, ats = quantize_sorted_cols(dy, pair, eoff, k, gdt, pow2, cnt, gather=True, wt=wt)
            dw2 = G.wgrad(at, ats, hqt, hst, eoff, torch.empty(E, H, inter, dtype=ctx.w_dtypes[1], device=x.device))
        if need[2]:
            bt, bts = quantize_sorted_cols(x, pair, eoff, k, E4M3, pow2, cnt, gather=True)
            dw13 = G.wgrad(gqt, gst, bt, bts, eoff, torch.empty(E, 2 * inter, H, dtype=ctx.w_dtypes[0],
                                                                device=x.device))
        dshared = dy if ctx.has_shared and need[4] else None
        return dx, dwt, dw13, dw2, dshared, None, None, None, None, None, None


def experts_fp8(x, topk_weight, w13, w2, shared_out, pair, eoff, top_k, recipe, out_dtype, act=None):
    return _ExpertsFp8.apply(x.contiguous(), topk_weight.float().contiguous(), w13, w2, shared_out, pair, eoff,
                             top_k, act, recipe, out_dtype)
