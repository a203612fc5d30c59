"""RMSNorm family, plain PyTorch. Rounding points follow the official HF code (variance in fp32, cast back to the
input dtype, then multiply by the weight), so bf16 runs match the published implementation bit for bit."""
from __future__ import annotations

import torch

from ..rope.reference import apply_rope


def rms_norm(x, weight, eps):
    """x [..., C], weight [C]. Returns weight * (x / rms(x)) in x.dtype, variance in fp32."""
    dt = x.dtype
    xf = x.float() if dt != torch.float64 else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dt)


def group_rms_norm_gate(o, weight, gate, num_groups, eps):
    """Linear-attention output path: GroupRMSNorm(o) * sigmoid(gate).

    o [..., C] (C = H*D), weight [C], gate [..., C] (= g_proj(x), from the layer input), num_groups groups of C/G
    contiguous channels, each RMS-normalised in fp32. Returns [..., C] in o.dtype.
    """
    dt = o.dtype
    shp = o.shape
    of = o.reshape(*shp[:-1], num_groups, shp[-1] // num_groups)
    of = of.float() if dt != torch.float64 else of
    of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * of.to(dt).reshape(shp)
    return y * torch.sigmoid(gate.to(dt))


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    """Per-head QK RMSNorm then partial NeoX RoPE on the first R dims, all in fp32, cast once.

    q [T, Hq, D], k [T, Hk, D], weights [D], cos/sin [T, R/2] fp32 (already times the YaRN attention factor).
    Returns q, k in their input dtype.
    """
    dt = q.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32

    def norm(x, w):
        x = x.to(acc)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * w.to(acc)

    qn, kn = norm(q, q_weight), norm(k, k_weight)
    return apply_rope(qn, cos, sin).to(dt), apply_rope(kn, cos, sin).to(dt)
