"""fp32 LM head on Triton: logits [N, V] fp32 = x [N, h] @ weight[V, h]^T, reading bf16 without fp32 copies.

bf16 x bf16 products are exact in fp32 and the MMA accumulates in fp32, so bf16 operands go straight to the tensor
cores; any fp32 operand makes the kernel up-cast both tiles and use IEEE fp32 dots (never TF32). The tiling is fixed
and the K loop runs in one order, so a row's logits do not depend on how many rows share the call (batch
invariance: log-probs of a request are the same in any batch). Backward uses bf16 tensor-core GEMMs (cuBLAS) on the
bf16-rounded fp32 logit gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import call
from .._triton import cdiv, patch_interpreter

patch_interpreter()  # CPU interpreter fixes; no-op for compiled kernels

LM_HEAD_CFG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@triton.jit
def _lm_head_kernel(x_ptr, w_ptr, o_ptr, N, V, stride_x, stride_w, stride_o, H: tl.constexpr, F32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(V, BLOCK_N)
    # GROUP_M row tiles walk the vocabulary together so each weight tile is read from HBM about once
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % (GROUP_M * num_n)) % size_m
    pn = (pid % (GROUP_M * num_n)) // size_m
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < N
    cmask = cols < V
    a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    b_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, H, BLOCK_K):
        a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=cmask[None, :], other=0.0)
        if F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tl.store(o_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


def lm_head_forward(x, weight):
    N, H = x.shape
    V = weight.shape[0]
    x = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty(N, V, dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    cfg = LM_HEAD_CFG
    bk = cfg["BLOCK_K"]
    while H % bk:
        bk //= 2
    if bk < 16:
        raise ValueError(f"lm_head_fp32: hidden size {H} must be a multiple of 16")
    half = (torch.bfloat16, torch.float16)
    grid = (cdiv(N, cfg["BLOCK_M"]) * cdiv(V, cfg["BLOCK_N"]),)
    _lm_head_kernel[grid](x, weight, out, N, V, x.stride(0), weight.stride(0), out.stride(0), H=H,
                          F32=not (x.dtype in half and weight.dtype == x.dtype), BLOCK_M=cfg["BLOCK_M"],
                          BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
    return out


class _LMHeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return lm_head_forward(x, weight)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        # bf16 weights: tensor-core GEMMs on the rounded gradient (an fp32 GEMM against a [V, h] weight would need
        # an fp32 copy of it and run ~15x slower); fp32 weights keep fp32.
        cdt = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
        g = g.to(cdt)
        dx = (g @ weight.to(cdt)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ x.to(cdt)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def lm_head_fp32(x, weight):
    """x [N, h] (bf16/fp32), weight [V, h] -> logits [N, V] fp32."""
    return call(_LMHeadFn, x, weight)
