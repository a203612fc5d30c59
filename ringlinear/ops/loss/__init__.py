"""Linear + cross-entropy over the fp32 LM head (training loss, RL log-probs): reference on CPU, fused on CUDA.

Signatures are those of `reference.py`.
"""
from __future__ import annotations

from ...backend import use_triton
from . import reference
from .reference import IGNORE_INDEX


def _impl(t):
    if use_triton(t):
        from . import triton as impl  # noqa: PLC0415  (Triton is optional: import only when used)
        return impl
    return reference


def linear_cross_entropy(x, weight, targets, temperature: float = 1.0, reduction: str = "sum"):
    return _impl(x).linear_cross_entropy(x, weight, targets, temperature=temperature, reduction=reduction)


def token_logprobs(logits, targets, temperature: float = 1.0):
    return _impl(logits).token_logprobs(logits, targets, temperature=temperature)


__all__ = ["linear_cross_entropy", "token_logprobs", "IGNORE_INDEX", "reference"]
