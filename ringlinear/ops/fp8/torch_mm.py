"""The dense FP8 GEMMs through torch's own blockwise scaled matmul (cuBLASLt, CUDA >= 12.9, Hopper only).

Our layouts are cuBLAS's: 1x128 scales stored tile-index-outer ([K/128, M] contiguous, seen as [M, K/128] with
strides (1, M)), 128x128 scales of W [N, K] as [N/128, K/128] (seen transposed). `torch.nn.functional.scaled_mm`
(explicit recipes) is used where the installed torch has it, `torch._scaled_mm` (recipe inferred from the scale
shapes) otherwise. Constraints (else a ValueError; the dispatcher then uses the Triton kernels): K/128 and N/128 a
multiple of 4 where they index 128x128 scales; the row count M of a 1x128-scaled A a multiple of 4 (fprop, dgrad;
a serving batch of 130 tokens takes the Triton GEMM); the weight gradient's K is the token count padded to whole tiles
(the cols copies are zero past the last token). `fits` checks them, and the "auto" dispatch (autograd.py) takes
the Triton kernels where they do not hold; a forced `torch` backend raises the ValueError instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def available(device=None) -> bool:
    """torch has a scaled matmul and (given a device) it is a Hopper GPU, where cuBLAS has the blockwise recipes."""
    if not (hasattr(F, "scaled_mm") or hasattr(torch, "_scaled_mm")):
        return False
    return device is None or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9)


def fits(kind, t, rows: int | None = None) -> bool:
    """Whether a GEMM meets the layout constraints below: t is the weight's 128x128 scales (fprop: ws, dgrad: wst)
    or, for wgrad, the cols copy of dY; `rows` the A operand's row count (fprop, dgrad). Measured on an H200
    (torch 2.11): with 1x128 scales cuBLASLt takes M = 4, 8, ..., 4096 and refuses M = 1 (scale strides), 2, 3
    and 130 (CUBLAS_STATUS_NOT_SUPPORTED, eagerly and under graph capture alike), so M must be a multiple of 4."""
    if kind == "wgrad":
        return t.shape[1] % 128 == 0
    return t.shape[1] % 4 == 0 and (rows is None or rows % 4 == 0)


def _mm(a, b, sa, sb, kinds, out_dtype):
    """a [M, K] row-major, b [K, N] column-major fp8; sa/sb laid out as the recipe kinds want."""
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        st = F.ScalingType
        ra, rb = {"1x128": st.BlockWise1x128, "128x128": st.BlockWise128x128}[kinds[0]], \
            {"1x128": st.BlockWise1x128, "128x128": st.BlockWise128x128}[kinds[1]]
        return F.scaled_mm(a, b, sa, ra, sb, rb, output_dtype=out_dtype)
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _v2() -> bool:
    return hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")


def _check(cond, what):
    if not cond:
        raise ValueError(f"torch scaled_mm path: {what}")


def fprop(xq, xs, wq, ws, out_dtype):
    """x rows (xq [T, K], xs [K/128, T]) @ W^T (wq [N, K], ws [N/128, K/128]) -> [T, N]."""
    _check(ws.shape[1] % 4 == 0, f"K/128={ws.shape[1]} must be a multiple of 4")
    _check(xq.shape[0] % 4 == 0, f"M={xq.shape[0]} rows must be a multiple of 4")
    return _mm(xq, wq.t(), xs.t(), ws.t(), ("1x128", "128x128"), out_dtype)


def dgrad(dq, ds, wqt, wst, out_dtype):
    """dY rows (dq [T, N], ds [N/128, T]) @ W (wqt [K, N], wst [K/128, N/128]) -> [T, K]."""
    _check(wst.shape[1] % 4 == 0, f"N/128={wst.shape[1]} must be a multiple of 4")
    _check(dq.shape[0] % 4 == 0, f"M={dq.shape[0]} rows must be a multiple of 4")
    return _mm(dq, wqt.t(), ds.t(), wst.t(), ("1x128", "128x128"), out_dtype)


def wgrad(dyt, dyts, xt, xts, out_dtype):
    """dY^T cols (dyt [N, Tp], dyts [Tp/128, N]) @ X (xt [K, Tp], xts [Tp/128, K]) -> dW [N, K]."""
    _check(dyt.shape[1] % 128 == 0, f"cols length {dyt.shape[1]} must be whole 128-row tiles")
    sb = xts.t() if _v2() else xts
    return _mm(dyt, xt.t(), dyts.t(), sb, ("1x128", "1x128"), out_dtype)
