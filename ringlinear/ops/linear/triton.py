"""A batch-invariant linear layer on Triton for numerics="aligned" on CUDA.

cuBLAS picks its algorithm (tile shape, split-K) from the problem shape, so a row's result changes with the number
of rows in the call: a request's projections would differ between a decode batch of 7 and one of 64, and between
the engine and the trainer. This GEMM always uses one tiling and one K order (BLOCK_K = 64, fp32 accumulation),
and each output row depends only on its input row. The backward (training) uses cuBLAS: gradients need no
alignment.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv, patch_interpreter

patch_interpreter()

# Two tiers, like the fused MoE's: small calls (decode) on 64-row tiles, large ones (prefill, training) on 128x256
# tiles, which run near cuBLAS's rate (64-row tiles reached half of it at M = 8192 on an H200). Both keep BLOCK_K = 64
# and >= 64 rows per warpgroup, so an output element takes the same k16 steps in the same order in either tier
# (benchmarks/aligned.py checks rows of small and large calls bitwise).
SMALL = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
LARGE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
LARGE_FROM_ROWS = 256


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, o_ptr, M, N, K, stride_x, stride_w, stride_o, HAS_BIAS: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """o [M, N] = x [M, K] @ w [N, K]^T (+ bias), fp32 accumulation, cast to o's dtype."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)  # GROUP_M row tiles walk the columns together: weight tiles reused in L2
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % (GROUP_M * num_n)) % size_m
    pn = (pid % (GROUP_M * num_n)) // size_m
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < N
    a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    b_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=cmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def linear_forward(x2, weight, bias=None):
    """x2 [M, K] (unit column stride), weight [N, K] -> [M, N] in x2's dtype."""
    M, K = x2.shape
    N = weight.shape[0]
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0:
        return out
    c = LARGE if M >= LARGE_FROM_ROWS else SMALL
    grid = (cdiv(M, c["BLOCK_M"]) * cdiv(N, c["BLOCK_N"]),)
    _linear_kernel[grid](x2, w, bias if bias is not None else w, out, M, N, K, x2.stride(0), w.stride(0),
                         out.stride(0), HAS_BIAS=bias is not None,
                         PREC="ieee" if x2.dtype == torch.float32 else "tf32", BLOCK_M=c["BLOCK_M"],
                         BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
                         num_warps=c["num_warps"], num_stages=c["num_stages"])
    return out


class _FixedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        shp = x.shape
        x2 = x.reshape(-1, shp[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return linear_forward(x2, weight, bias).view(*shp[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight).view(*dy.shape[:-1], x2.shape[-1]) if ctx.needs_input_grad[0] else None
        dw = dy2.t() @ x2 if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x, weight, bias=None):
    """F.linear(x [..., K], weight [N, K], bias [N]) with a row-invariant forward."""
    if x.dtype != weight.dtype:
        raise TypeError(f"fixed-tile linear needs x and weight in one dtype, got {x.dtype} and {weight.dtype}")
    return _FixedLinear.apply(x, weight, bias)
