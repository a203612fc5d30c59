"""Partial NeoX rotary embedding with optional YaRN scaling, computed the way transformers does."""
from __future__ import annotations

import math

import torch


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim))


def yarn_inv_freq(base: float, dim: int, max_position_embeddings: int, rope_scaling: dict):
    """transformers' `_compute_yarn_parameters`: returns (inv_freq [dim/2] fp32, attention_factor)."""
    factor = float(rope_scaling["factor"])
    attention_factor = rope_scaling.get("attention_factor")
    mscale = rope_scaling.get("mscale")
    mscale_all_dim = rope_scaling.get("mscale_all_dim")
    if "original_max_position_embeddings" in rope_scaling:
        orig = rope_scaling["original_max_position_embeddings"]
        factor = max_position_embeddings / orig
    else:
        orig = max_position_embeddings

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def corr_dim(num_rot):
        return (dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = inter * (1 - extra_factor) + extra * extra_factor
    return inv_freq, float(attention_factor)


def rope_parameters(rope_theta: float, rotary_dim: int, max_position_embeddings: int, rope_scaling: dict | None):
    """(inv_freq [R/2] fp32, attention_scaling). Unsupported scaling types raise."""
    if not rope_scaling:
        return default_inv_freq(rope_theta, rotary_dim), 1.0
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return default_inv_freq(rope_theta, rotary_dim), 1.0
    if kind == "yarn":
        return yarn_inv_freq(rope_theta, rotary_dim, max_position_embeddings, rope_scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}: ringlinear supports 'default' and 'yarn'")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
    """positions [T] int -> cos, sin [T, R/2] fp32 (times the attention factor, as HF does)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device, torch.float32)[None, :]
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX half rotation on the first R = 2*cos.shape[-1] dims of x [T, H, D]; the rest passes through."""
    half = cos.shape[-1]
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)
