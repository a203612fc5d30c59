"""Optimizer kernels: AdamW with fp32 master weights (reference on CPU, one fused Triton pass on CUDA)."""
from __future__ import annotations

from ...backend import use_triton
from . import reference


def adamw_step(param, grad, master, exp_avg, exp_avg_sq, **kw) -> None:
    if use_triton(param):
        from .triton import adamw_step as f
        return f(param, grad, master, exp_avg, exp_avg_sq, **kw)
    return reference.adamw_step(param, grad, master, exp_avg, exp_avg_sq, **kw)


__all__ = ["adamw_step", "reference"]
