"""FP8 support for the Triton interpreter (TRITON_INTERPRET=1, the CPU test path); compiled kernels are untouched.

Triton 3.6's interpreter converts to and from float8 with its own bit arithmetic (`_convert_float`), which is wrong
for the values these kernels meet: ties round half-up instead of to even, e4m3 subnormals flush to zero, values
beyond the format's range wrap to an unrelated number (1000 -> 256) and NaN becomes 384. `tl.dot` on fp8 operands
goes through the same conversion. The GPU converts with `cvt.rn.satfinite` (round to nearest even, saturate to the
largest finite value, NaN stays NaN), exactly as torch's CPU casts do, so the patch routes every conversion that
involves an fp8 type, and fp8 dot operands, through torch. The base patch (runtime loop bounds, bf16 dots and
casts) is applied first.
"""
from __future__ import annotations

import os

from ..lightning_attn.triton_compat import patch_interpreter as _patch_base

_done = False


def patch_interpreter() -> None:
    global _done
    _patch_base()
    if _done or os.environ.get("TRITON_INTERPRET") != "1":
        return
    _done = True
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter as itp

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
