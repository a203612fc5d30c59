"""Fused linear + cross-entropy (Triton, interpreter on CPU) against the fp32 reference: loss, gradients,
per-token losses with recompute, temperature, ignored targets, chunk independence."""
import pytest
import torch

pytest.importorskip("triton")
from ringlinear.ops.loss import reference as R  # noqa: E402
from ringlinear.ops.loss import triton as T  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _data(N=37, h=64, V=1000, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, h, generator=g)).to(dtype).to(DEV)
    w = (torch.randn(V, h, generator=g) * 0.2).to(dtype).to(DEV)
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    return x, w, t.to(DEV)


def _grads(fn, x, w, *args, **kw):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = fn(x, w, *args, **kw)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device) if out.dim() else \
        torch.tensor(0.7, device=out.device)
    (out * gout).sum().backward()
    return out.detach(), x.grad, w.grad


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_fp32(reduction, temperature):
    x, w, t = _data()
    ref = _grads(R.linear_cross_entropy, x.double(), w.double(), t, temperature, reduction)
    got = _grads(T.linear_cross_entropy, x, w, t, temperature, reduction, chunk_rows=16)
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-5
    if reduction == "none":
        assert torch.all(got[0][t == -100] == 0)


def test_chunking_does_not_change_a_row():
    x, w, t = _data(N=40)
    a = T.linear_cross_entropy(x, w, t, reduction="none", chunk_rows=8)
    b = T.linear_cross_entropy(x, w, t, reduction="none", chunk_rows=40)
    assert torch.equal(a, b)


def test_bf16_inputs_within_bf16_tolerance():
    x, w, t = _data(dtype=torch.bfloat16, seed=3)
    ref = _grads(R.linear_cross_entropy, x.double(), w.double(), t, 1.0, "sum")
    got = _grads(T.linear_cross_entropy, x, w, t, 1.0, "sum", chunk_rows=16)
    assert _rel(got[0], ref[0]) < 1e-5  # fp32 logits from bf16 operands are exact products
    assert _rel(got[1], ref[1]) < 1e-2 and _rel(got[2], ref[2]) < 1e-2  # bf16-rounded logit gradient


def test_token_logprobs_rows_and_batch_invariant():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(9, 3000, generator=g) * 3).to(DEV)
    t = torch.randint(0, 3000, (9,), generator=g).to(DEV)
    lp, lse = T.token_logprobs(logits, t, 0.9)
    rlp, rlse = R.token_logprobs(logits.double(), t, 0.9)
    assert _rel(lp, rlp) < 1e-6 and _rel(lse, rlse) < 1e-6
    one, _ = T.token_logprobs(logits[4:5], t[4:5], 0.9)
    assert torch.equal(one[0], lp[4])


def test_bad_reduction_is_an_error():
    x, w, t = _data(N=4)
    with pytest.raises(ValueError, match="reduction"):
        T.linear_cross_entropy(x, w, t, reduction="avg")
