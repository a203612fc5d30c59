"""Fused AdamW step with fp32 master weights: one pass per parameter tensor.

Per element it reads the gradient (model dtype), the fp32 master weight and both fp32 moments, and writes the three
fp32 states and the parameter in its own dtype: 28 bytes per bf16 parameter, against ~40 for casting the gradient
to fp32 and running torch's fused AdamW on fp32 master Parameters, then copying them back. The gradient-clipping
factor is read from device memory, so clipping needs no host sync.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._triton import cdiv, patch_interpreter

patch_interpreter()

BLOCK = 4096


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, w_ptr, m_ptr, v_ptr, scale_ptr, n, lr, beta1, beta2, eps, decay, step_size,
                  sqrt_bc2, HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    g = tl.load(g_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr)
    if HAS_MASTER:
        w = tl.load(w_ptr + offs, mask=msk, other=0.0)
    else:
        w = tl.load(p_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=msk, other=0.0)
    v = tl.load(v_ptr + offs, mask=msk, other=0.0)
    w = w * decay
    m = m + (1 - beta1) * (g - m)  # torch's lerp for weights below 0.5
    v = beta2 * v + (1 - beta2) * g * g
    w = w - step_size * (m / (tl.sqrt(v) / sqrt_bc2 + eps))
    tl.store(m_ptr + offs, m, mask=msk)
    tl.store(v_ptr + offs, v, mask=msk)
    if HAS_MASTER:
        tl.store(w_ptr + offs, w, mask=msk)
    tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty), mask=msk)


def adamw_step(param, grad, master, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
               grad_scale=None) -> None:
    """Same contract as reference.adamw_step; every tensor contiguous and of param's shape."""
    n = param.numel()
    for t in (grad, exp_avg, exp_avg_sq) + ((master,) if master is not None else ()):
        if t.numel() != n or not t.is_contiguous():
            raise ValueError(f"adamw_step: tensors must be contiguous with {n} elements")
    if not param.is_contiguous():
        raise ValueError("adamw_step: the parameter must be contiguous")
    if n == 0:
        return
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    dummy = exp_avg
    _adamw_kernel[(cdiv(n, BLOCK),)](
        param, grad, master if master is not None else dummy, exp_avg, exp_avg_sq,
        grad_scale if grad_scale is not None else dummy, n, lr, beta1, beta2, eps, 1 - lr * weight_decay,
        lr / bc1, bc2 ** 0.5, HAS_MASTER=master is not None, HAS_SCALE=grad_scale is not None, BLOCK=BLOCK,
        num_warps=8)
