"""Helpers every Triton kernel module shares: the interpreter fixes, the SM count, host-side cdiv / next power of
two. Imported only by those modules (Triton is optional: nothing else in the package imports it).

`patch_interpreter()` keeps the Triton interpreter (TRITON_INTERPRET=1, the CPU test path) usable for these
kernels. Four defects of Triton 3.6's interpreter, patched only when it is active (compiled kernels are untouched):
- it turns a scalar tensor into a Python int with `int(handle.data)` but holds scalars as 1-element arrays,
  which numpy >= 2.4 refuses, so any `range()` over a runtime bound fails;
- `tl.dot` on bf16 operands multiplies their raw 16-bit patterns as integers (numpy has no bf16);
- fp32 -> bf16 casts truncate, where the GPU rounds to nearest even (a -2.8e-3 relative bias that would make
  bf16 tolerance checks fail on the CPU for no fault of the kernel);
- float8 conversions use its own bit arithmetic: ties round half-up instead of to even, e4m3 subnormals flush to
  zero, out-of-range values wrap (1000 -> 256) and NaN becomes 384; `tl.dot` on fp8 operands goes through it. The
  GPU converts with `cvt.rn.satfinite` (round to nearest even, saturate, NaN stays NaN), as torch's CPU casts do,
  so every conversion involving an fp8 type, and fp8 dot operands, go through torch.
And one property the kernels' tests rely on: `tl.dot` runs `np.matmul`, whose BLAS kernel may compute a row
differently by its position in the tile (OpenBLAS's Haswell kernels on an AMD EPYC: 34 of 64 rows of a 64x64x64
product changed bits when moved to row 0; none did on the AVX-512 machines before, 2026-12-02). A GPU MMA gives a
row the same bits wherever it sits, and the row-invariance tests claim that, so the interpreter's dot is a plain
`np.einsum` loop (no BLAS, the same per-element order for every row; ~5x matmul's time).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter as itp

_patched = False


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. `triton.cdiv` is a ConstexprFunction in Triton 3.6: ~3 us per host call, and the
    launch wrappers of one prefill step make hundreds of them."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as `triton.next_power_of_2`, at plain-Python cost."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()



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

    def as_f32(h):
        if h.dtype == tl.bfloat16:  # bf16 bits are the top half of the fp32 with the same value
            return itp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = as_f32(a), as_f32(b)  # (fp8 operands arrive as fp32: `_patch_fp8` wraps this)
        prod = np.einsum("...mk,...kn->...mn", a.data, b.data, dtype=d.data.dtype, optimize=False)
        return itp.TensorHandle(prod + d.data, d.dtype.scalar)

    builder_cls.create_dot = create_dot
    orig_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return itp.TensorHandle(bits.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder_cls.cast_impl = cast_impl
    _patch_fp8()


def _patch_fp8() -> None:
    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    plain = {tl.float32: (torch.float32, np.float32), tl.float16: (torch.float16, np.float16),
             tl.bfloat16: (torch.bfloat16, np.uint16), tl.float64: (torch.float64, np.float64)}

    def to_torch(h):
        """A TensorHandle of a float type -> a torch tensor with the same values."""
        if h.dtype in fp8:
            return torch.from_numpy(np.ascontiguousarray(h.data, dtype=np.uint8)).view(fp8[h.dtype])
        tdt, ndt = plain[h.dtype]
        t = torch.from_numpy(np.ascontiguousarray(h.data, dtype=ndt))
        return t.view(torch.bfloat16) if tdt == torch.bfloat16 else t

    def from_torch(t, dst):
        if dst in fp8:
            return itp.TensorHandle(t.view(torch.uint8).numpy(), dst)
        tdt, ndt = plain[dst]
        return itp.TensorHandle((t.view(torch.int16) if tdt == torch.bfloat16 else t).numpy().view(ndt), dst)

    def fp8_cast(h, dst):
        t = to_torch(h)
        if dst in fp8:  # saturate like cvt.rn.satfinite; NaN stays NaN (clamp keeps it)
            m = torch.finfo(fp8[dst]).max
            t = t.float().clamp(-m, m)  # exact from fp32/bf16/fp16 sources
            return from_torch(t.to(fp8[dst]), dst)
        return from_torch(t.to(torch.float32).to(plain[dst][0]), dst)

    builder_cls = type(itp.interpreter_builder)
    orig_fp_to_fp = builder_cls.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        if (src.dtype.scalar in fp8 or dst in fp8) and src.dtype.scalar in {**fp8, **plain} and dst in {**fp8,
                                                                                                        **plain}:
            return fp8_cast(src, dst)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    builder_cls.create_fp_to_fp = create_fp_to_fp
    orig_dot = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # fp8 values are exact in fp32 and so are their products: an fp32 dot is the exact-product reference
        if a.dtype in fp8:
            a = fp8_cast(a, tl.float32)
        if b.dtype in fp8:
            b = fp8_cast(b, tl.float32)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot


def num_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (the current one when it has no index); None for any other
    device (the interpreter), where each caller picks a small program count of its own."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
