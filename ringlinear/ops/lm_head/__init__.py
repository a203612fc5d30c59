"""fp32 LM head: dispatch between the reference (CPU) and the Triton kernel (CUDA)."""
from __future__ import annotations

from ...backend import use_triton
from . import reference


def lm_head_fp32(x, weight):
    """x [N, h], weight [V, h] -> logits [N, V] fp32 (model-dtype inputs, fp32 accumulation and output)."""
    if use_triton(x):
        from . import triton as impl  # noqa: PLC0415  (Triton is optional: import only when used)
        return impl.lm_head_fp32(x, weight)
    return reference.lm_head_fp32(x, weight)


__all__ = ["lm_head_fp32", "reference"]
