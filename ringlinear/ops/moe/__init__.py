"""MoE ops: dispatch between the reference and the fused Triton kernels (when present)."""
from __future__ import annotations

from . import reference
from .reference import moe_experts, moe_forward, route, swiglu

__all__ = ["route", "moe_experts", "moe_forward", "swiglu", "reference"]
