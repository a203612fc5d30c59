"""fp32 LM head (Triton) against F.linear on fp32 up-casts (CPU: Triton interpreter; CUDA: compiled kernel)."""
import pytest
import torch

pytest.importorskip("triton")

from ringlinear.ops import lm_head  # noqa: E402
from ringlinear.ops.lm_head import reference as ref  # noqa: E402
from ringlinear.ops.lm_head import triton as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, V = 64, 300  # V not a multiple of the tile: edge masks are exercised


def make(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g).to(DEV, dtype)
    w = (torch.randn(V, H, generator=g) * H ** -0.5).to(DEV, dtype)
    return x, w


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_fp32_reference(dtype):
    x, w = make(40, dtype)
    out = tri.lm_head_fp32(x, w)
    assert out.dtype == torch.float32 and out.shape == (40, V)
    # bf16 products are exact in fp32: both dtypes agree with the fp32 reference to fp32 rounding
    assert rel(out, ref.lm_head_fp32(x, w)) < 1e-6


def test_mixed_fp32_input_bf16_weight():
    x, w = make(8, torch.bfloat16)
    x = x.float() + 1e-3  # not representable in bf16: must not be rounded
    assert rel(tri.lm_head_fp32(x, w), ref.lm_head_fp32(x, w)) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gradients(dtype, tol):
    x, w = make(24, dtype, seed=1)
    g = torch.randn(24, V, generator=torch.Generator().manual_seed(2)).to(DEV)
    grads = []
    for impl in (tri, ref):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (impl.lm_head_fp32(xx, ww) * g).sum().backward()
        assert xx.grad.dtype == dtype and ww.grad.dtype == dtype
        grads.append((xx.grad, ww.grad))
    assert rel(grads[0][0], grads[1][0]) < tol and rel(grads[0][1], grads[1][1]) < tol


def test_batch_invariant_and_repeatable():
    x, w = make(40, torch.bfloat16, seed=3)
    out = tri.lm_head_fp32(x, w)
    assert torch.equal(out, tri.lm_head_fp32(x, w))
    # the interpreter's dot (OpenBLAS) depends on a row's position in the tile; compiled kernels do not
    for i in ((0, 17, 39) if DEV == "cuda" else (0,)):
        assert torch.equal(tri.lm_head_fp32(x[i:i + 1], w)[0], out[i])


def test_dispatch(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    x, w = make(4, torch.bfloat16)
    assert torch.equal(lm_head.lm_head_fp32(x, w), tri.lm_head_fp32(x, w))
