"""Batch-invariant GEMMs: every row of a linear layer computed in a fixed-shape block.

Measured on CPU (torch 2.13, MKL/oneDNN, fp32): `F.linear` rounds a row differently depending on how many rows
share the call (M = 1 takes a GEMV path; M >= 4 a blocked GEMM whose result for a row changes with M). So a
request decoding alone and the same request batched with seven others got different logits. Within a call of a
*fixed* row count the result of a row does not depend on its position in the block nor on the other rows, and
`bmm` over a stack of such blocks computes each block exactly like a single call.

`RowBlockMode` therefore routes every `F.linear` in the model (projections, experts, router, LM head) through
`bmm` on blocks of exactly `row_block` rows (the last block zero-padded).

The second measured culprit: fp32 `sigmoid` and `silu` compute the vectorised body of a tensor with SIMD code and
the leftover tail (numel mod 2 x vector width, and the tail of each thread's share) with a scalar formula that
rounds differently, so an element's value depends on where it sits in the tensor. The mode evaluates them on the
flattened tensor zero-padded to a multiple of 64 elements, in pieces below the intra-op parallel grain, so every
element takes the SIMD path. The rest of the forward is already per-row or per-sequence (arithmetic, exp, rsqrt,
cos/sin, row reductions, per-sequence attention: measured invariant). Cost: at most row_block - 1 padded rows per
linear call and 63 padded elements per activation piece.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_LINEAR = (F.linear, torch._C._nn.linear)
_ACTIVATIONS = {torch.sigmoid: torch.sigmoid, torch.Tensor.sigmoid: torch.sigmoid, F.silu: F.silu,
                torch._C._nn.silu: torch._C._nn.silu}
_PAD = 64           # a multiple of 2 x the widest SIMD vector (AVX-512: 16 fp32 lanes, 32 bf16)
_PIECE = 1 << 14    # below torch's intra-op grain (32768): one thread runs each piece, no split tail


def row_block_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     row_block: int = 16) -> torch.Tensor:
    """Same as F.linear(x [..., K], weight [N, K], bias [N]) -> [..., N], each row computed in a fixed block."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return F.linear(x, weight, bias)
    nb = -(-M // row_block)
    pad = nb * row_block - M
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, K)])
    y = torch.bmm(x2.view(nb, row_block, K), weight.t().expand(nb, K, N)).view(nb * row_block, N)[:M]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], N)


def padded_elementwise(fn, x: torch.Tensor) -> torch.Tensor:
    """fn (elementwise) applied so that every element runs the SIMD path, whatever x's size."""
    flat = x.reshape(-1)
    n = flat.numel()
    out = torch.empty_like(flat)
    for s in range(0, n, _PIECE):
        piece = flat[s:s + _PIECE]
        m = piece.numel()
        pad = -m % _PAD
        if pad:
            piece = torch.cat([piece, piece.new_zeros(pad)])
        out[s:s + m] = fn(piece)[:m]
    return out.view(x.shape)


def suspended():
    """Context manager: leave the mode for code that is per-sequence anyway (attention), because a Python
    dispatch on every torch call there costs more than the model's own work at small sizes."""
    return torch._C.DisableTorchFunction()


class RowBlockMode(TorchFunctionMode):
    """Inside `with RowBlockMode(16):` every F.linear is batch invariant (see module docstring)."""

    def __init__(self, row_block: int = 16):
        super().__init__()
        self.row_block = row_block

    def fresh(self) -> "RowBlockMode":
        return RowBlockMode(self.row_block)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            return row_block_linear(*args, **kwargs, row_block=self.row_block)
        if (func in _ACTIVATIONS and len(args) == 1 and not kwargs.get("inplace", False)
                and args[0].dtype == torch.float32):
            return padded_elementwise(_ACTIVATIONS[func], args[0])
        return func(*args, **kwargs)
