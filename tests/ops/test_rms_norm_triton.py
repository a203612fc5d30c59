"""Triton RMSNorm (interpreter on CPU) against the reference: forward at the reference's rounding points, gradients
vs fp64 autograd, a row's output independent of the other rows."""
import pytest
import torch

pytest.importorskip("triton")
from ringlinear.ops.norm import reference as ref  # noqa: E402
from ringlinear.ops.norm.triton_rms import rms_norm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("C", [64, 96])  # 96: a row narrower than its power-of-two block (masked)
def test_fp32_forward_and_grads(C):
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(3, 7, C, generator=g) * 3).to(DEV).requires_grad_()
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(DEV).requires_grad_()
    y = rms_norm(x, w, 1e-6)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = ref.rms_norm(xd, wd, 1e-6)
    assert _rel(y, yr) < 1e-6
    dy = torch.randn(y.shape, generator=g).to(DEV)
    gx, gw = torch.autograd.grad((y * dy).sum(), (x, w))
    rx, rw = torch.autograd.grad((yr * dy.double()).sum(), (xd, wd))
    assert _rel(gx, rx) < 1e-5 and _rel(gw, rw) < 1e-5


def test_bf16_matches_reference_rounding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 128, generator=g).to(DEV, torch.bfloat16)
    w = (1 + 0.1 * torch.randn(128, generator=g)).to(DEV, torch.bfloat16)
    y, yr = rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)
    assert y.dtype == yr.dtype == torch.bfloat16
    # same rounding points; the fp32 statistics may differ in the last bit: at most one bf16 ulp apart
    assert ((y.float() - yr.float()).abs() <= yr.float().abs() * 2 ** -7 + 1e-6).all()


def test_row_does_not_depend_on_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 64, generator=g).to(DEV)
    w = torch.randn(64, generator=g).to(DEV)
    assert torch.equal(rms_norm(x, w, 1e-6)[17], rms_norm(x[17:18], w, 1e-6)[0])
