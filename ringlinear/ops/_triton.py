"""Helpers every Triton kernel module shares: the interpreter fixes and the SM count. Imported only by those modules
(Triton is optional: nothing else in the package imports it).

`patch_interpreter()` keeps the Triton interpreter (TRITON_INTERPRET=1, the CPU test path) usable for these
kernels. Three defects of Triton 3.6's interpreter, patched only when it is active (compiled kernels are untouched):
- it turns a scalar tensor into a Python int with `int(handle.data)` but holds scalars as 1-element arrays,
  which numpy >= 2.4 refuses, so any `range()` over a runtime bound fails;
- `tl.dot` on bf16 operands multiplies their raw 16-bit patterns as integers (numpy has no bf16);
- fp32 -> bf16 casts truncate, where the GPU rounds to nearest even (a -2.8e-3 relative bias that would make
  bf16 tolerance checks fail on the CPU for no fault of the kernel).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter as itp

_patched = False


def patch_interpreter() -> None:
    global _patched
    if _patched or os.environ.get("TRITON_INTERPRET") != "1":
        return
    _patched = True
    orig = getattr(itp, "_patch_lang_tensor", None)
    if orig is None:  # a Triton whose interpreter is laid out differently: nothing to fix here
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    itp._patch_lang_tensor = patched
    builder_cls = type(itp.interpreter_builder)
    orig_dot = builder_cls.create_dot

    def as_f32(h):
        if h.dtype == tl.bfloat16:  # bf16 bits are the top half of the fp32 with the same value
            return itp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    orig_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return itp.TensorHandle(bits.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder_cls.cast_impl = cast_impl


def num_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (the current one when it has no index); None for any other
    device (the interpreter), where each caller picks a small program count of its own."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
