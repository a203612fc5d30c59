"""The FP8 recipe a layer runs with, the switch that turns FP8 off for a scope, the non-finite counter, and the
choice of implementation (Triton kernels, the CPU emulation only on request, otherwise a one-line error)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ...backend import use_triton
from .reference import E4M3, E5M2, check_fp8_dtype

_GRAD_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}


@dataclass(frozen=True)
class Fp8Recipe:
    """grad_dtype: codes of dY and the other gradients (e4m3 is the default, see docs/fp8.md for the measured
    error of both); pow2_scales: tile scales rounded up to powers of two (exact rescaling); emulate: allow the
    exact CPU emulation (quantise -> dequantise -> fp32 GEMM) where the Triton kernels cannot run; experts: the
    routed and shared experts in FP8 too. Off by default: on an H200 (benchmarks/fp8.py, 2026-12-01) our FP8
    grouped expert GEMMs ran fwd+bwd at 0.54x (hidden 2048) and 0.66x (hidden 4096) the bf16 fused MoE, so the
    MoE stays bf16 and only the dense projections and the dense MLP run FP8."""
    grad_dtype: torch.dtype = E4M3
    pow2_scales: bool = False
    emulate: bool = False
    experts: bool = False

    def __post_init__(self):
        check_fp8_dtype(self.grad_dtype)

    @classmethod
    def from_env(cls) -> "Fp8Recipe":
        """RINGLINEAR_FP8_GRAD=e4m3|e5m2, RINGLINEAR_FP8_POW2=1, RINGLINEAR_FP8_EMULATE=1, RINGLINEAR_FP8_EXPERTS=1."""
        g = os.environ.get("RINGLINEAR_FP8_GRAD", "e4m3").strip().lower()
        if g not in _GRAD_DTYPES:
            raise ValueError(f"RINGLINEAR_FP8_GRAD={g!r}: expected one of {sorted(_GRAD_DTYPES)}")
        return cls(grad_dtype=_GRAD_DTYPES[g], pow2_scales=os.environ.get("RINGLINEAR_FP8_POW2") == "1",
                   emulate=os.environ.get("RINGLINEAR_FP8_EMULATE") == "1",
                   experts=os.environ.get("RINGLINEAR_FP8_EXPERTS") == "1")


_disabled = 0


@contextlib.contextmanager
def fp8_disabled():
    """Run FP8-converted modules in their original precision inside this scope (e.g. evaluation in bf16)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def fp8_active() -> bool:
    return _disabled == 0


def impl(x: torch.Tensor, recipe: Fp8Recipe) -> str:
    """'triton' or 'emulate' for an FP8 op on x; raises (one line) where neither is allowed."""
    if use_triton(x):
        if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
            cap = "%d.%d" % torch.cuda.get_device_capability(x.device)
            raise RuntimeError(f"fp8 needs FP8 tensor cores (sm_89+, e.g. H100/H200); this GPU is sm_{cap}")
        return "triton"
    if recipe.emulate or os.environ.get("RINGLINEAR_FP8_EMULATE") == "1":
        return "emulate"
    raise RuntimeError(f"fp8 on a {x.device.type} tensor needs CUDA with Triton; for the (slow, exact) CPU "
                       "emulation pass Fp8Recipe(emulate=True) or set RINGLINEAR_FP8_EMULATE=1")


_counters: dict[torch.device, torch.Tensor] = {}


def nonfinite_counter(device) -> torch.Tensor:
    """int64 [1] on `device`: non-finite values met by FP8 quantisers since the last reset. Kernels add to it
    without a host sync; one value can be counted by several quantisers (e.g. dY by its rows and cols copies)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    c = _counters.get(dev)
    if c is None:
        with torch.inference_mode(False):  # made first inside the engine's inference mode, reset outside it
            c = _counters[dev] = torch.zeros(1, dtype=torch.int64, device=dev)
    return c


def read_nonfinite(device, reset: bool = True) -> int:
    """The counter's value (one host sync: call it every --log-every steps, not every step)."""
    c = nonfinite_counter(device)
    n = int(c.item())
    if reset:
        c.zero_()
    return n
