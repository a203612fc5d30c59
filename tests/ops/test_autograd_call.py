"""ops/_autograd.call: Function.apply when a gradient can flow through a tensor argument, the bare forward on a
stand-in context otherwise, with the same values."""
import pytest
import torch

from ringlinear.ops._autograd import call


class _Mul(torch.autograd.Function):
    applied = 0

    @staticmethod
    def forward(ctx, x, w, scale):
        ctx.save_for_backward(x, w)
        ctx.set_materialize_grads(False)
        ctx.scale = scale
        return x * w * scale, (x > 0).long()

    @staticmethod
    def backward(ctx, g, _gmask):
        x, w = ctx.saved_tensors
        return g * w * ctx.scale, g * x * ctx.scale, None


@pytest.fixture
def counted(monkeypatch):
    calls = []
    orig = _Mul.apply
    monkeypatch.setattr(_Mul, "apply", lambda *a: calls.append(1) or orig(*a))
    return calls


def test_gradients_flow_through_apply(counted):
    x, w = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    y, _ = call(_Mul, x, w, 2.0)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert counted == [1] and torch.equal(gx, 2.0 * w.detach()) and torch.equal(gw, 2.0 * x.detach())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_input_needs_grad"])
def test_forward_alone_when_no_gradient_can_flow(counted, mode):
    x, w = torch.randn(7), torch.randn(7)
    want = x * w * 3.0
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode)
    if ctx is None:
        y, m = call(_Mul, x, w, 3.0)
    else:
        xg = x.clone().requires_grad_()
        with ctx():
            y, m = call(_Mul, xg, w, 3.0)
    assert counted == [] and torch.equal(y, want) and torch.equal(m, (x > 0).long()) and not y.requires_grad


def test_triton_rms_norm_same_values_either_way():
    pytest.importorskip("triton")
    from ringlinear.ops.norm.triton_rms import rms_norm
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(6, 64, device=dev).requires_grad_()
    w = torch.ones(64, device=dev) + 0.1 * torch.randn(64, device=dev)
    with_grad = rms_norm(x, w, 1e-6)
    with torch.no_grad():
        bare = rms_norm(x, w, 1e-6)
    assert with_grad.requires_grad and not bare.requires_grad and torch.equal(bare, with_grad.detach())
