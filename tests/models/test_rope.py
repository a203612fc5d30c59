"""Partial NeoX RoPE and YaRN, checked against an independent fp64 derivation of the published formulas."""
import math

import pytest
import torch

from ringlinear.ops.rope.reference import apply_rope, rope_cos_sin, rope_parameters


def test_default_rope_rotates_first_half_pairs():
    R, D, base = 8, 16, 10000.0
    inv, scale = rope_parameters(base, R, 4096, None)
    assert scale == 1.0
    pos = torch.tensor([0, 3, 17])
    cos, sin = rope_cos_sin(pos, inv)
    x = torch.randn(3, 2, D, dtype=torch.float64)
    y = apply_rope(x, cos.double(), sin.double())
    for t, p in enumerate(pos.tolist()):
        for j in range(R // 2):
            th = p * base ** (-2 * j / R)
            a, b = x[t, :, j], x[t, :, j + R // 2]
            assert torch.allclose(y[t, :, j], a * math.cos(th) - b * math.sin(th), atol=1e-5)
            assert torch.allclose(y[t, :, j + R // 2], b * math.cos(th) + a * math.sin(th), atol=1e-5)
    assert torch.equal(y[..., R:], x[..., R:])  # the other half passes through


def test_yarn_matches_formula():
    """YaRN (factor 4 over 128K, as the model card's 512K extension): ramp between the beta_fast/beta_slow
    correction dims, interpolated frequencies below, extrapolated above, attention factor 0.1 ln(s) + 1."""
    R, base, orig, factor = 64, 1e6, 131072, 4.0
    inv, att = rope_parameters(base, R, orig, {"rope_type": "yarn", "factor": factor})
    assert att == pytest.approx(0.1 * math.log(factor) + 1)

    def corr(rot):
        return R * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    lo, hi = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), R - 1)
    for j in range(R // 2):
        f = base ** (-2 * j / R)
        ramp = min(max((j - lo) / (hi - lo), 0.0), 1.0)
        expect = (f / factor) * ramp + f * (1 - ramp)
        assert inv[j].item() == pytest.approx(expect, rel=1e-5)
    cos, _ = rope_cos_sin(torch.tensor([0]), inv, att)
    assert cos[0, 0].item() == pytest.approx(att)  # linear layers see the factor too (HF multiplies cos/sin)


def test_unsupported_scaling_is_an_error():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'longrope'"):
        rope_parameters(1e4, 8, 4096, {"rope_type": "longrope", "factor": 2.0})
