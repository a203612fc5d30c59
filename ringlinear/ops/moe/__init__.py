"""MoE ops: dispatch between the reference (CPU) and the fused Triton kernels (CUDA).

Signatures are those of `reference.py`; see its docstrings for layouts and semantics.
"""
from __future__ import annotations

from ...backend import use_triton
from . import reference
from .reference import swiglu


def _impl(t):
    if use_triton(t):
        from . import triton as impl  # noqa: PLC0415  (Triton is optional: import only when used)
        return impl
    return reference


def route(x, weight, expert_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    return _impl(x).route(x, weight, expert_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)


def moe_experts(x, topk_idx, topk_weight, w13, w2):
    return _impl(x).moe_experts(x, topk_idx, topk_weight, w13, w2)


def moe_forward(x, router_weight, expert_bias, w13, w2, shared, *, top_k, n_group, topk_group,
                routed_scaling_factor, norm_topk_prob=True):
    return _impl(x).moe_forward(x, router_weight, expert_bias, w13, w2, shared, top_k=top_k, n_group=n_group,
                                topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                                norm_topk_prob=norm_topk_prob)


__all__ = ["route", "moe_experts", "moe_forward", "swiglu", "reference"]
