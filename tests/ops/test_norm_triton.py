"""Fused Triton norms (group RMSNorm x sigmoid gate; QK RMSNorm + partial RoPE), forward and backward, against
autograd through the reference (CPU: Triton interpreter; CUDA: compiled kernels).

fp32 inputs: 1e-5 relative to fp64. bf16 inputs: the forward follows the reference's rounding points, so it must
agree to bf16 resolution; gradients within the 1e-2 kernel-gradient budget of docs/numerics.md.
"""
import pytest
import torch

pytest.importorskip("triton")

from ringlinear.ops import norm as dispatch  # noqa: E402
from ringlinear.ops.norm import reference as ref  # noqa: E402
from ringlinear.ops.norm import triton as tri  # noqa: E402
from ringlinear.ops.rope.reference import default_inv_freq, rope_cos_sin  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rand(*shape, gen, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=DEV, dtype=dtype)


def check_grads(fn_tri, fn_ref, inputs, outs_like, tol, gen):
    """Random output gradients; compare input gradients of the kernel with fp64 autograd through the reference."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn_tri(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    dys = [rand(*o.shape, gen=gen, dtype=o.dtype) for o in outs]
    g1 = torch.autograd.grad(sum((o.float() * d.float()).sum() for o, d in zip(outs, dys)), xs)
    xd = [x.detach().double().requires_grad_() for x in inputs]
    routs = fn_ref(*xd)
    routs = routs if isinstance(routs, tuple) else (routs,)
    g2 = torch.autograd.grad(sum((o * d.double()).sum() for o, d in zip(routs, dys)), xd)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert a.dtype == inputs[i].dtype
        assert rel(a, b) < tol, (i, rel(a, b))


@pytest.mark.parametrize("C,G", [(128, 4), (96, 4), (64, 1)])  # 96/4 = 24: a non-power-of-two group (masked)
def test_group_norm_gate_fp32(C, G):
    gen = torch.Generator().manual_seed(C + G)
    o, gate = rand(3, 5, C, gen=gen, scale=2.0), rand(3, 5, C, gen=gen)
    w = rand(C, gen=gen, scale=0.1, shift=1.0)
    y = tri.group_rms_norm_gate(o, w, gate, G, 1e-6)
    assert rel(y, ref.group_rms_norm_gate(o.double(), w.double(), gate.double(), G, 1e-6)) < 1e-5
    check_grads(lambda a, b, c: tri.group_rms_norm_gate(a, b, c, G, 1e-6),
                lambda a, b, c: ref.group_rms_norm_gate(a, b, c, G, 1e-6), [o, w, gate], None, 1e-5, gen)


def test_group_norm_gate_bf16():
    gen = torch.Generator().manual_seed(1)
    C, G = 256, 4
    o, gate = rand(70, C, gen=gen, dtype=torch.bfloat16), rand(70, C, gen=gen, dtype=torch.bfloat16)
    w = rand(C, gen=gen, scale=0.1, shift=1.0, dtype=torch.bfloat16)
    y = tri.group_rms_norm_gate(o, w, gate, G, 1e-6)
    yr = ref.group_rms_norm_gate(o, w, gate, G, 1e-6)
    assert y.dtype == yr.dtype == torch.bfloat16
    torch.testing.assert_close(y, yr, rtol=1e-2, atol=1e-2)  # same rounding points: equal up to 1 bf16 ulp
    check_grads(lambda a, b, c: tri.group_rms_norm_gate(a, b, c, G, 1e-6),
                lambda a, b, c: ref.group_rms_norm_gate(a, b, c, G, 1e-6), [o, w, gate], None, 1e-2, gen)


def _rope(T, R, base=10000.0, offset=0):
    return rope_cos_sin(torch.arange(offset, offset + T), default_inv_freq(base, R))


@pytest.mark.parametrize("D,R", [(32, 16), (64, 64)])  # partial rotary (the model's) and full rotary
def test_qk_norm_rope_fp32(D, R):
    gen = torch.Generator().manual_seed(D)
    T, Hq, Hk = 9, 3, 2
    q, k = rand(T, Hq, D, gen=gen, scale=3.0), rand(T, Hk, D, gen=gen)
    qw, kw = rand(D, gen=gen, scale=0.1, shift=1.0), rand(D, gen=gen, scale=0.1, shift=1.0)
    cos, sin = (x.to(DEV) for x in _rope(T, R, offset=5))
    a, b = tri.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    ra, rb = ref.qk_norm_rope(q.double(), k.double(), qw.double(), kw.double(), cos.double(), sin.double(), 1e-6)
    assert rel(a, ra) < 1e-5 and rel(b, rb) < 1e-5
    check_grads(lambda *x: tri.qk_norm_rope(*x, cos, sin, 1e-6),
                lambda *x: ref.qk_norm_rope(*x, cos.double(), sin.double(), 1e-6), [q, k, qw, kw], None, 1e-5, gen)


def test_qk_norm_rope_fused_qkv_views_batched_bf16():
    # q, k as head-slices of one fused projection [B, T, Hq + 2 Hk, D], bf16, with a batch dimension
    gen = torch.Generator().manual_seed(2)
    B, T, Hq, Hk, D = 2, 6, 4, 2, 64
    qkv = rand(B, T, Hq + 2 * Hk, D, gen=gen, dtype=torch.bfloat16)
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk]
    qw, kw = (rand(D, gen=gen, scale=0.1, shift=1.0, dtype=torch.bfloat16) for _ in range(2))
    cos, sin = (x.to(DEV) for x in _rope(T, D // 2))
    a, b = tri.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    ra, rb = ref.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    assert a.shape == q.shape and a.dtype == torch.bfloat16 and a.is_contiguous()
    torch.testing.assert_close(a, ra, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(b, rb, rtol=1e-2, atol=1e-2)
    check_grads(lambda *x: tri.qk_norm_rope(*x, cos, sin, 1e-6),
                lambda *x: ref.qk_norm_rope(*x, cos.double(), sin.double(), 1e-6), [q, k, qw, kw], None, 1e-2, gen)


def test_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    o, gate, w = rand(4, 64, gen=gen), rand(4, 64, gen=gen), rand(64, gen=gen, shift=1.0)
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    a = dispatch.group_rms_norm_gate(o, w, gate, 2, 1e-6)
    assert torch.equal(a, tri.group_rms_norm_gate(o, w, gate, 2, 1e-6))
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    assert rel(dispatch.group_rms_norm_gate(o, w, gate, 2, 1e-6), a) < 1e-5
