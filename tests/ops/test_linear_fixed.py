"""The fixed-tile linear (Triton; interpreter on CPU): equals F.linear within fp32 rounding, and a row's result does
not depend on how many rows share the call; gradients through it equal F.linear's."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from ringlinear.ops.linear.triton import linear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_matches_f_linear_and_is_row_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=g).to(DEV)  # 300 rows: the large tier; slices below: the small one
    w = torch.randn(200, 96, generator=g).to(DEV)
    b = torch.randn(200, generator=g).to(DEV)
    y = linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6
    for rows in (slice(3, 4), slice(0, 1), slice(5, 69), slice(1, 299)):
        assert torch.equal(linear(x[rows], w, b), y[rows])


def test_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 64, generator=g).to(DEV).requires_grad_()
    w = torch.randn(32, 64, generator=g).to(DEV).requires_grad_()
    dy = torch.randn(2, 9, 32, generator=g).to(DEV)
    a = torch.autograd.grad((linear(x, w) * dy).sum(), (x, w))
    b = torch.autograd.grad((F.linear(x, w) * dy).sum(), (x, w))
    for u, v in zip(a, b):
        assert float((u - v).norm() / v.norm()) < 1e-6
