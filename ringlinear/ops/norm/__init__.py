"""Norm ops: dispatch between the reference and the Triton kernels."""
from __future__ import annotations

from ...backend import use_triton
from . import reference


def rms_norm(x, weight, eps):
    if use_triton(x):
        from .triton_rms import rms_norm as f
        return f(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def group_rms_norm_gate(o, weight, gate, num_groups, eps):
    if use_triton(o):
        from .triton import group_rms_norm_gate as f
        return f(o, weight, gate, num_groups, eps)
    return reference.group_rms_norm_gate(o, weight, gate, num_groups, eps)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    if use_triton(q):
        from .triton import qk_norm_rope as f
        return f(q, k, q_weight, k_weight, cos, sin, eps)
    return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)


__all__ = ["rms_norm", "group_rms_norm_gate", "qk_norm_rope"]
