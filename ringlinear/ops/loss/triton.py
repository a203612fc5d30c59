"""Fused linear + cross-entropy on the GPU: no [tokens, vocab] fp32 logits tensor for the whole batch.

Rows are processed in chunks. Per chunk: fp32 logits from the fp32 LM-head kernel (bf16 operands, fp32 accumulation,
fixed tiling: a row's logits do not depend on the chunk), then one Triton program per row computes logsumexp in a
fixed order and, when the loss is a sum or a mean (so its gradient is known up to the scalar that arrives in
backward), the logit gradient softmax(z) - onehot straight into a bf16 buffer. dx and dW follow with bf16
tensor-core GEMMs (fp32 accumulation; dW accumulated in fp32 across chunks), as the LM head's own backward rounds
its gradient. The backward only scales them by the incoming gradient. Per-token losses ("none", e.g. RL log-probs)
keep just logsumexp and recompute the logits chunk by chunk in backward.

Bytes per chunk row: V*4 logits written + 2 reads + V*2 gradient written, against the unfused path's fp32 logits,
log-softmax output and its gradient (each V*4, written and read).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..lm_head.triton import lm_head_forward
from .._triton import patch_interpreter
from .reference import IGNORE_INDEX

patch_interpreter()

BLOCK_V = 2048       # vocabulary slice per loop step of the row kernel (fixed: the reduction order never changes)
CHUNK_ROWS = 4096    # rows per chunk: 4096 x 157184 fp32 logits = 2.6 GB, GEMMs large enough to run at full rate


@triton.jit
def _ce_row_kernel(logit_ptr, tgt_ptr, lse_ptr, zt_ptr, grad_ptr, scale_ptr, V, stride_l, stride_g, inv_temp,
                   WANT_GRAD: tl.constexpr, PER_ROW_SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: lse = logsumexp(z), z = logit * inv_temp; zt = z[target]; optionally
    grad = (softmax(z) - onehot(target)) * inv_temp * scale (0 for an ignored row), stored in grad's dtype.
    Running max and sum are kept per lane and reduced once at the end: a fixed order for every row."""
    row = tl.program_id(0).to(tl.int64)
    base = logit_ptr + row * stride_l
    t = tl.load(tgt_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    zt = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        z = tl.load(base + c, mask=c < V, other=float("-inf")) * inv_temp
        m_new = tl.maximum(m, z)
        # lanes still at -inf (past the vocabulary so far) keep s = 0 without producing NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
        zt += tl.where(c == t, z, 0.0)
    M = tl.max(m, 0)
    lse = M + tl.log(tl.sum(s * tl.exp(m - M), 0))
    tl.store(lse_ptr + row, lse)
    tl.store(zt_ptr + row, tl.sum(zt, 0))
    if WANT_GRAD:
        g_scale = inv_temp
        if PER_ROW_SCALE:
            g_scale = g_scale * tl.load(scale_ptr + row)
        keep = t != -100
        gbase = grad_ptr + row * stride_g
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            z = tl.load(base + c, mask=c < V, other=0.0) * inv_temp
            g = tl.exp(z - lse) - tl.where(c == t, 1.0, 0.0)
            g = tl.where(keep, g * g_scale, 0.0)
            tl.store(gbase + c, g.to(grad_ptr.dtype.element_ty), mask=c < V)


def ce_rows(logits, targets, temperature=1.0, grad=None, row_scale=None):
    """logits [n, V] fp32 (row stride any), targets [n] -> (lse [n], z_target [n]) fp32; fills `grad` [n, V]
    with d(sum of losses, each times row_scale[i])/d logits when given."""
    n, V = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    zt = torch.empty_like(lse)
    if n == 0:
        return lse, zt
    assert logits.stride(1) == 1 and (grad is None or grad.stride(1) == 1)
    dummy = lse
    _ce_row_kernel[(n,)](logits, targets, lse, zt, grad if grad is not None else dummy,
                         row_scale if row_scale is not None else dummy, V, logits.stride(0),
                         grad.stride(0) if grad is not None else 0, 1.0 / float(temperature),
                         WANT_GRAD=grad is not None, PER_ROW_SCALE=row_scale is not None, BLOCK_V=BLOCK_V,
                         num_warps=8)
    return lse, zt


class _TokenLogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        lse, zt = ce_rows(logits, targets, temperature)
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        return zt - lse, lse

    @staticmethod
    def backward(ctx, glp, _glse):
        logits, targets = ctx.saved_tensors
        g = torch.empty_like(logits)
        # d logp / d logits = (onehot - softmax) / T: the loss kernel's gradient scaled by -glp per row
        ce_rows(logits, targets, ctx.temperature, grad=g, row_scale=(-glp).float().contiguous())
        return g, None, None


def token_logprobs(logits, targets, temperature=1.0):
    """Same contract as reference.token_logprobs, with the fixed-order row kernel (batch invariant); log-probs are
    differentiable w.r.t. the logits (logsumexp is returned detached)."""
    lp, lse = _TokenLogprobsFn.apply(logits.float().contiguous(), targets.contiguous(), float(temperature))
    return lp, lse.detach()


def _chunks(n: int, rows: int):
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def _accumulate_dw(acc, g, xc):
    """acc [V, h] fp32 += g^T [V, c] @ xc [c, h], bf16 operands, fp32 accumulation and output."""
    if acc.is_cuda:
        torch.addmm(acc, g.t(), xc, out_dtype=torch.float32, out=acc)
    else:  # the interpreter path (CPU tests): same maths
        acc += g.t().float() @ xc.float()


class _LinearCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, temperature, reduction, chunk_rows):
        N, h = x.shape
        V = weight.shape[0]
        x = x.contiguous()
        targets = targets.contiguous()
        lse = torch.empty(N, dtype=torch.float32, device=x.device)
        zt = torch.empty_like(lse)
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        fused = need and reduction != "none"
        dx = torch.empty_like(x) if fused and ctx.needs_input_grad[0] else None
        dw = torch.zeros(V, h, dtype=torch.float32, device=x.device) if fused and ctx.needs_input_grad[1] else None
        mean_scale = None
        if fused and reduction == "mean":  # 1 / kept targets, on the device (no host sync)
            kept = (targets != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
            mean_scale = (1.0 / kept).expand(N).contiguous()
        for s, e in _chunks(N, chunk_rows):
            logits = lm_head_forward(x[s:e], weight)                           # [c, V] fp32
            g = torch.empty(e - s, V, dtype=weight.dtype, device=x.device) if fused else None
            lse[s:e], zt[s:e] = ce_rows(logits, targets[s:e], temperature, grad=g,
                                        row_scale=None if mean_scale is None else mean_scale[s:e])
            del logits
            if fused:
                if dx is not None:
                    dx[s:e] = g @ weight.to(g.dtype)
                if dw is not None:
                    _accumulate_dw(dw, g, x[s:e].to(g.dtype))
        loss = torch.where(targets != IGNORE_INDEX, lse - zt, torch.zeros_like(lse))
        ctx.reduction, ctx.temperature, ctx.chunk_rows = reduction, float(temperature), chunk_rows
        ctx.weight_dtype = weight.dtype
        if fused:
            ctx.save_for_backward(dx, dw)
        elif need:
            ctx.save_for_backward(x, weight, targets, lse)
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.sum() / (targets != IGNORE_INDEX).sum().clamp_min(1)
        return loss

    @staticmethod
    def backward(ctx, gout):
        if ctx.reduction != "none":
            dx, dw = ctx.saved_tensors
            gx = (dx * gout.to(dx.dtype)) if dx is not None else None
            gw = (dw * gout).to(ctx.weight_dtype) if dw is not None else None
            return gx, gw, None, None, None, None
        x, weight, targets, lse = ctx.saved_tensors
        N, h = x.shape
        V = weight.shape[0]
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(V, h, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        gout = gout.float().contiguous()
        for s, e in _chunks(N, ctx.chunk_rows):
            logits = lm_head_forward(x[s:e], weight)
            g = torch.empty(e - s, V, dtype=weight.dtype, device=x.device)
            ce_rows(logits, targets[s:e], ctx.temperature, grad=g, row_scale=gout[s:e])
            del logits
            if gx is not None:
                gx[s:e] = g @ weight.to(g.dtype)
            if gw is not None:
                _accumulate_dw(gw, g, x[s:e].to(g.dtype))
        return gx, (gw.to(weight.dtype) if gw is not None else None), None, None, None, None


def linear_cross_entropy(x, weight, targets, temperature: float = 1.0, reduction: str = "sum",
                         chunk_rows: int = CHUNK_ROWS):
    """Same contract as reference.linear_cross_entropy (x [N, h] bf16/fp32, weight [V, h], targets [N])."""
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != (x.shape[0],):
        raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)}, weight {tuple(weight.shape)}, targets "
                         f"{tuple(targets.shape)}")
    return _LinearCEFn.apply(x, weight, targets, temperature, reduction, int(chunk_rows))
