"""Fused MoE on Triton: same signatures and semantics as `reference.py`, differentiable for training.

Pipeline (forward): router kernel (fp32 logits from bf16 inputs, sigmoid, group-limited top-k with the expert bias,
lowest index on ties) -> stable counting sort of the N*k (token, slot) pairs by expert, planned on the device ->
gate/up grouped GEMM with SwiGLU in the epilogue -> down grouped GEMM writing each pair's row -> weighted combine
over slots in fp32, slot order (+ the shared expert's output). Backward: d SwiGLU fused into the GEMM against W2,
dx per pair reduced over slots, per-expert weight gradients, router gradient through the selected weights only.

Deterministic by default (docs/numerics.md): no atomics, fixed reduction order, bitwise repeatable and batch invariant.
`RINGLINEAR_MOE_DETERMINISTIC=0` (or `deterministic=False`) switches the combine and dx reductions to fp32 atomics.
"""
from __future__ import annotations

import os

import torch

from .._autograd import call
from . import triton_gemm as G
from .reference import swiglu
from .triton_route import make_plan, router_backward_sparse, router_forward


def deterministic_default() -> bool:
    return os.environ.get("RINGLINEAR_MOE_DETERMINISTIC", "1").strip() != "0"


class _RouteFn(torch.autograd.Function):
    """Router + expert-sorted plan. Outputs (idx, weights, logits, sorted_pair, eoff); grads reach x and the router
    weight through the chosen experts' weights and through the logits."""

    @staticmethod
    def forward(ctx, x, weight, expert_bias, top_k, n_group, topk_group, scale, norm):
        idx, wt, logits = router_forward(x, weight, expert_bias, top_k, n_group, topk_group, scale, norm)
        pair, eoff = make_plan(idx, weight.shape[0])
        ctx.mark_non_differentiable(idx, pair, eoff)
        ctx.set_materialize_grads(False)  # unused logits must arrive as None, not zeros: keeps the sparse backward
        ctx.save_for_backward(x, weight, idx, logits, pair, eoff)
        ctx.scale, ctx.norm = scale, bool(norm and top_k > 1)
        return idx, wt, logits, pair, eoff

    @staticmethod
    def backward(ctx, _gidx, gw, glogits, _gpair, _geoff):
        # No gradient through the choice of experts; the weights of the chosen ones depend on their sigmoid scores.
        x, weight, idx, logits, pair, eoff = ctx.saved_tensors
        dsel = None
        if gw is not None:
            p = torch.sigmoid(logits.gather(1, idx))
            gw = gw.float()
            if ctx.norm:
                s = p.sum(-1, keepdim=True) + 1e-20
                dp = ctx.scale / s * (gw - (gw * p).sum(-1, keepdim=True) / s)
            else:
                dp = ctx.scale * gw
            dsel = dp * p * (1 - p)                                              # d logit of each chosen expert
        if glogits is None:
            if dsel is None:
                return (None,) * 8
            dx, dw = router_backward_sparse(dsel, idx, weight, x, pair, eoff)
        else:  # a loss on the logits (e.g. z-loss) makes the logit gradient dense: fp32 GEMMs
            dl = glogits.float().clone()
            if dsel is not None:
                dl.scatter_add_(1, idx, dsel)
            dx = (dl @ weight.float()).to(x.dtype)
            dw = (dl.t() @ x.float()).to(weight.dtype)
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None)


class _ExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wt, w13, w2, shared_out, pair, eoff, top_k, deterministic):
        N, H = x.shape
        need_grad = any(ctx.needs_input_grad[:4])
        h, ab = G.gateup(x, w13, pair, eoff, top_k, save_ab=need_grad)          # [N*k, I], [N*k, 2I]
        down_strides = (w2.stride(0), w2.stride(1), w2.stride(2))               # B_e[k=i, n=h] = w2[e, h, i]
        if deterministic:
            o = torch.empty(N * top_k, H, dtype=x.dtype, device=x.device)      # one row per (token, slot)
            G.rows_gemm(h, w2, down_strides, H, pair, eoff, top_k, o)
            y = G.combine(o, wt, shared_out, x.dtype)
        else:
            acc = torch.zeros(N, H, dtype=torch.float32, device=x.device)
            G.rows_gemm(h, w2, down_strides, H, pair, eoff, top_k, acc, wt=wt, atomic=True)
            y = acc.to(x.dtype) if shared_out is None else acc.to(x.dtype) + shared_out
        ctx.save_for_backward(x, wt, w13, w2, pair, eoff, h, ab)
        ctx.top_k, ctx.deterministic = top_k, deterministic
        ctx.has_shared = shared_out is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wt, w13, w2, pair, eoff, h, ab = ctx.saved_tensors
        k = ctx.top_k
        N, H = x.shape
        dy = dy.contiguous()
        dab, part = G.dswiglu(dy, w2, ab, h, wt, pair, eoff, k)                # [N*k, 2I], [P, N*k]
        dx = dwt = dw13 = dw2 = None
        dx_strides = (w13.stride(0), w13.stride(2), w13.stride(1))              # B_e[k=j, n=h] = w13[e, j, h]
        if ctx.deterministic:
            dxp = torch.empty(N * k, H, dtype=x.dtype, device=x.device)
            G.rows_gemm(dab, w13, dx_strides, H, pair, eoff, k, dxp, which="dx")
            dx, dwt = G.combine_bwd(dxp, part, N, k, x.dtype)
        else:
            acc = torch.zeros(N, H, dtype=torch.float32, device=x.device)
            G.rows_gemm(dab, w13, dx_strides, H, pair, eoff, k, acc, atomic=True, which="dx")
            dx, dwt = acc.to(x.dtype), part.sum(0).view(N, k)
        if ctx.needs_input_grad[3]:
            dw2 = G.wgrad(dy, h, torch.empty(w2.shape, dtype=w2.dtype, device=w2.device), pair, eoff, k,
                          a_gather=True, b_gather=False, wt=wt)
        if ctx.needs_input_grad[2]:
            dw13 = G.wgrad(dab, x, torch.empty(w13.shape, dtype=w13.dtype, device=w13.device), pair, eoff, k,
                           a_gather=False, b_gather=True)
        dshared = dy if ctx.has_shared and ctx.needs_input_grad[4] else None
        return dx, dwt, dw13, dw2, dshared, None, None, None, None


def _experts(x, topk_weight, w13, w2, shared_out, pair, eoff, top_k, deterministic):
    if x.dtype != w13.dtype or x.dtype != w2.dtype:
        raise TypeError(f"fused MoE needs x, w13, w2 in one dtype (got {x.dtype}, {w13.dtype}, {w2.dtype})")
    if deterministic is None:
        deterministic = deterministic_default()
    return call(_ExpertsFn, x.contiguous(), topk_weight.float().contiguous(), w13, w2, shared_out, pair, eoff, top_k,
                bool(deterministic))


def route(x, weight, expert_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    """x [N, h], weight [E, h] -> (topk_idx [N, k] int64, topk_weight [N, k] fp32, logits [N, E] fp32)."""
    return call(_RouteFn, x, weight, expert_bias, top_k, n_group, topk_group, float(routed_scaling_factor),
                norm_topk_prob)[:3]


def moe_experts(x, topk_idx, topk_weight, w13, w2, *, deterministic=None):
    """x [N, h]; topk_idx/topk_weight [N, k]; w13 [E, 2I, h]; w2 [E, h, I] -> [N, h] in x.dtype."""
    pair, eoff = make_plan(topk_idx, w13.shape[0])
    return _experts(x, topk_weight, w13, w2, None, pair, eoff, topk_idx.shape[1], deterministic)


def moe_forward(x, router_weight, expert_bias, w13, w2, shared, *, top_k, n_group, topk_group,
                routed_scaling_factor, norm_topk_prob=True, deterministic=None):
    """Routed experts plus the unweighted shared expert -> (y [N, h], topk_idx, topk_weight, router_logits)."""
    idx, w, logits, pair, eoff = call(_RouteFn, x, router_weight, expert_bias, top_k, n_group, topk_group,
                                      float(routed_scaling_factor), norm_topk_prob)
    shared_out = swiglu(x, *shared) if shared is not None else None
    y = _experts(x, w, w13, w2, shared_out, pair, eoff, top_k, deterministic)
    return y, idx, w, logits
