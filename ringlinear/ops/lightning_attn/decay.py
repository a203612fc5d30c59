"""The per-head decay of the linear-attention layers: fixed, not a checkpoint tensor (model.md §2(c), docs/decay.md).

Head h of linear layer l decays its state by exp(g_h) per token, g_h = -slope_h * f(l): ALiBi slopes for the head
count times a per-layer factor, in one of two published formulas ("hf", the default; "sglang").
"""
from __future__ import annotations

import math

import torch

FORMULAS = ("hf", "sglang")


def alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes for n heads (the lightning-attention decay base); non powers of 2 interleave the 2p list."""
    def pow2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]
    if math.log2(n).is_integer():
        return pow2(n)
    p = 2 ** math.floor(math.log2(n))
    return pow2(p) + alibi_slopes(2 * p)[0::2][: n - p]


def layer_decay_factor(layer_idx: int, num_layers: int, formula: str = "hf") -> float:
    """hf: 1 - (l-1)/(L-1) + 1e-5 (official remote code, transformers bailing_hybrid); sglang: 1 - l/(L-1) + 1e-5."""
    denom = max(num_layers - 1, 1)
    if formula == "hf":
        return 1 - (layer_idx - 1) / denom + 1e-5
    if formula == "sglang":
        return 1 - layer_idx / denom + 1e-5
    raise ValueError(f"decay formula must be one of {FORMULAS}, got {formula!r}")


def layer_log_decay(num_heads: int, layer_idx: int, num_layers: int, formula: str = "hf") -> torch.Tensor:
    """g_gamma [H] fp32 = -slope_h * f(layer): the per-head log decay of one linear layer."""
    # Same arithmetic as the HF buffer: fp32 slopes times a Python-float factor, negated.
    s = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device="cpu")
    return -s * layer_decay_factor(layer_idx, num_layers, formula)
