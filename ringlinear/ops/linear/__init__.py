"""Linear layers whose rows do not depend on the batch (numerics="aligned"), as modes that reroute `F.linear`.

- CPU: `RowBlockMode` computes every row in a fixed 16-row block through `bmm` (CPU BLAS rounds a row differently
  with the number of rows otherwise; measured) and evaluates fp32 sigmoid/silu so that every element takes the same
  SIMD path.
- CUDA: `FixedTileLinearMode` sends `F.linear` to one fixed-tile Triton GEMM (`triton.py`); everything else in the
  model on CUDA is already one fixed kernel per op.
`invariant_mode(device)` picks the one for a device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .rowblock import RowBlockMode, padded_elementwise, row_block_linear, suspended

_LINEAR = (F.linear, torch._C._nn.linear)


class FixedTileLinearMode(TorchFunctionMode):
    """Inside `with FixedTileLinearMode():` every F.linear on CUDA tensors runs the fixed-tile Triton GEMM."""

    def fresh(self) -> "FixedTileLinearMode":
        return FixedTileLinearMode()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR and args[0].is_cuda:
            from .triton import linear  # noqa: PLC0415  (Triton is optional)
            return linear(*args, **kwargs)
        return func(*args, **kwargs)


def active_invariant_mode():
    """A fresh copy of the innermost batch-invariant linear mode in effect, or None. Code that autograd runs again
    outside the mode (activation checkpointing recomputes a layer in backward) re-enters it with this, so the
    recomputed forward matches the first one."""
    from torch.overrides import _get_current_function_mode_stack
    for m in reversed(_get_current_function_mode_stack()):
        if isinstance(m, (RowBlockMode, FixedTileLinearMode)):
            return m.fresh()
    return None


def invariant_mode(device, row_block: int = 16):
    """The batch-invariant linear mode for `device` (a context manager)."""
    return FixedTileLinearMode() if torch.device(device).type == "cuda" else RowBlockMode(row_block)


__all__ = ["RowBlockMode", "FixedTileLinearMode", "invariant_mode", "active_invariant_mode", "padded_elementwise", "row_block_linear",
           "suspended"]
