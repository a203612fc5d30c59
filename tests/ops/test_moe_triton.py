"""Fused Triton MoE against the reference MoE (CPU: Triton interpreter at small shapes; CUDA: compiled kernels).

fp32 runs compare tightly (the kernels use IEEE fp32 dots); bf16 runs use bf16 tolerances (relative RMS).
Determinism and batch invariance are checked bitwise.
"""
import pytest
import torch

pytest.importorskip("triton")

from ringlinear.ops.moe import reference as ref  # noqa: E402
from ringlinear.ops.moe import triton as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# hidden, experts, intermediate, top-k, groups, groups kept: the model's routing structure at toy size
H, E, INTER, K, NG, TG = 64, 16, 32, 4, 4, 2
ROUTE = dict(top_k=K, n_group=NG, topk_group=TG, routed_scaling_factor=2.5, norm_topk_prob=True)


def make(n, dtype, seed=0, shared=True):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEV)

    x = r(n, H).to(dtype)
    wr = r(E, H, scale=0.2).to(dtype)
    bias = r(E, scale=0.05).float()
    w13 = r(E, 2 * INTER, H, scale=H ** -0.5).to(dtype)
    w2 = r(E, H, INTER, scale=INTER ** -0.5).to(dtype)
    sh = tuple(t.to(dtype) for t in (r(INTER, H, scale=H ** -0.5), r(INTER, H, scale=H ** -0.5),
                                     r(H, INTER, scale=INTER ** -0.5))) if shared else None
    return x, wr, bias, w13, w2, sh


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(dtype):
    x, wr, bias, *_ = make(40, dtype)
    idx, w, logits = tri.route(x, wr, bias, **ROUTE)
    ridx, rw, rlogits = ref.route(x, wr, bias, **ROUTE)
    assert idx.dtype == torch.int64 and torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, rlogits, rtol=1e-5, atol=1e-5)


def test_route_ties_lowest_index():
    # Duplicate router rows give exactly tied scores (and tied groups); the lowest index must win everywhere.
    x, wr, _, *_ = make(24, torch.float32)
    wr = wr[torch.arange(E) // 2 * 2]                   # experts 2j and 2j+1 identical
    wr[E // NG:2 * E // NG] = wr[:E // NG]             # group 1 ties group 0 as a whole
    for bias in (None, torch.zeros(E, device=DEV)):
        idx, w, _ = tri.route(x, wr, bias, **ROUTE)
        ridx, rw, _ = ref.route(x, wr, bias, **ROUTE)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_moe_forward_matches_reference(dtype, tol):
    x, wr, bias, w13, w2, sh = make(24, dtype)
    y, idx, w, logits = tri.moe_forward(x, wr, bias, w13, w2, sh, **ROUTE)
    ry, ridx, rw, rlogits = ref.moe_forward(x, wr, bias, w13, w2, sh, **ROUTE)
    assert y.dtype == dtype and torch.equal(idx, ridx)
    assert rel(y, ry) < tol


def test_plan_is_a_stable_sort_by_expert():
    from ringlinear.ops.moe.triton_route import PLAN_BLOCK_B, PLAN_BLOCK_T, make_plan

    n = PLAN_BLOCK_T * PLAN_BLOCK_B + 37  # more histogram blocks than one step of the prefix sum over blocks
    idx = torch.randint(0, E, (n, K), generator=torch.Generator().manual_seed(11)).to(DEV)  # repeats in rows too
    pair, eoff = make_plan(idx, E)
    flat = idx.reshape(-1)
    assert torch.equal(pair.long(), torch.argsort(flat, stable=True))
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(eoff.long(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]))


def test_moe_experts_repeated_expert_in_a_row():
    # The API allows any indices; a row naming one expert twice must count it twice, like the reference.
    x, _, _, w13, w2, _ = make(8, torch.float32, shared=False)
    idx = torch.randint(0, E, (8, K), generator=torch.Generator().manual_seed(3)).to(DEV)
    idx[:, 1] = idx[:, 0]
    w = torch.rand(8, K, generator=torch.Generator().manual_seed(4)).to(DEV)
    assert rel(tri.moe_experts(x, idx, w, w13, w2), ref.moe_experts(x, idx, w, w13, w2)) < 1e-5


def _grads(impl, x, wr, bias, w13, w2, sh, gy, gl, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, wr, w13, w2, *sh)]
    xx, wwr, ww13, ww2, *ssh = leaves
    y, _, _, logits = impl.moe_forward(xx, wwr, bias, ww13, ww2, tuple(ssh), **ROUTE, **kw)
    loss = (y.float() * gy).sum()
    if gl is not None:  # a loss on the logits makes the router gradient dense (another backward path)
        loss = loss + (logits * gl).sum()
    loss.backward()
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("tier,logit_loss", [("small", True), ("small", False), ("large", False)])
def test_gradients_match_reference_fp32(tier, logit_loss, monkeypatch):
    if tier == "large":  # the 128x128-tile configs used from many rows per expert on
        from ringlinear.ops.moe import triton_gemm
        monkeypatch.setattr(triton_gemm, "LARGE_ROWS_PER_EXPERT", 1)
    x, wr, bias, w13, w2, sh = make(24, torch.float32)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(24, H, generator=g).to(DEV)
    gl = torch.randn(24, E, generator=g).to(DEV) * 0.1 if logit_loss else None
    _, got = _grads(tri, x, wr, bias, w13, w2, sh, gy, gl)
    _, want = _grads(ref, x, wr, bias, w13, w2, sh, gy, gl)
    for name, a, b in zip(("x", "router", "w13", "w2", "gate", "up", "down"), got, want):
        assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("deterministic", [True, False])
def test_gradients_bf16(deterministic):
    x, wr, bias, w13, w2, sh = make(24, torch.bfloat16)
    g = torch.Generator().manual_seed(8)
    gy = torch.randn(24, H, generator=g).to(DEV)
    gl = None
    y, got = _grads(tri, x, wr, bias, w13, w2, sh, gy, gl, deterministic=deterministic)
    ry, want = _grads(ref, x, wr, bias, w13, w2, sh, gy, gl)
    assert rel(y, ry) < 1e-2
    for name, a, b in zip(("x", "router", "w13", "w2"), got, want):
        assert rel(a, b) < 1e-2, name


def test_deterministic_bitwise_repeatable():
    x, wr, bias, w13, w2, sh = make(40, torch.bfloat16, seed=1)
    gy = torch.randn(40, H, generator=torch.Generator().manual_seed(9)).to(DEV)
    gl = None
    y1, g1 = _grads(tri, x, wr, bias, w13, w2, sh, gy, gl)
    y2, g2 = _grads(tri, x, wr, bias, w13, w2, sh, gy, gl)
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_batch_invariance():
    from ringlinear.ops.moe.triton_route import ROUTER_CFG

    bt = ROUTER_CFG["BLOCK_T"]
    n = bt + 9
    x, wr, bias, w13, w2, sh = make(n, torch.bfloat16, seed=2)
    y, idx, w, logits = tri.moe_forward(x, wr, bias, w13, w2, sh, **ROUTE)
    # The interpreter's dot is numpy/OpenBLAS, whose result for a row depends on its position inside the tile;
    # there, only rows at the start of a router tile are comparable. Compiled kernels are checked at any row.
    rows = (0, 17, n - 1) if DEV == "cuda" else (0, bt)
    for i in rows:
        y1, idx1, w1, l1 = tri.moe_forward(x[i:i + 1], wr, bias, w13, w2, sh, **ROUTE)
        assert torch.equal(idx1[0], idx[i]) and torch.equal(w1[0], w[i]) and torch.equal(l1[0], logits[i])
        assert torch.equal(y1[0], y[i])


def test_dispatch_uses_triton(monkeypatch):
    from ringlinear.ops import moe

    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    x, wr, bias, w13, w2, sh = make(8, torch.bfloat16, seed=5)
    got = moe.moe_forward(x, wr, bias, w13, w2, sh, **ROUTE)
    want = tri.moe_forward(x, wr, bias, w13, w2, sh, **ROUTE)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
