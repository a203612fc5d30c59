"""The one place that decides which implementation an op runs.

CUDA tensors use the Triton kernels, CPU tensors the plain-PyTorch reference. `RINGLINEAR_BACKEND=torch|triton`
forces one (triton on CPU needs `TRITON_INTERPRET=1`). Softmax prefill has no kernel of ours: 16-bit CUDA tensors
take torch SDPA in the model dtype, everything else the fp32 reference (`use_sdpa`). A kernel error is raised,
never swallowed: there is no silent fallback to the reference.
"""
from __future__ import annotations

import functools
import os

import torch

_VALID = ("auto", "torch", "triton")


def backend_override() -> str:
    b = os.environ.get("RINGLINEAR_BACKEND", "auto").strip().lower() or "auto"
    if b not in _VALID:
        raise ValueError(f"RINGLINEAR_BACKEND={b!r}: expected one of {_VALID}")
    return b


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t) -> bool:
    """True when the op on tensor `t` should run its Triton kernel."""
    b = backend_override()
    if b == "torch":
        return False
    if b == "triton":
        if not triton_available():
            raise RuntimeError("RINGLINEAR_BACKEND=triton but triton is not installed (pip install 'ringlinear[triton]')")
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("RINGLINEAR_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return t.device.type == "cuda" and triton_available()


def use_sdpa(t) -> bool:
    """True when causal softmax attention on `t` should run torch SDPA in the model dtype (16-bit CUDA tensors,
    unless RINGLINEAR_BACKEND=torch forces the fp32 reference)."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and backend_override() != "torch"
