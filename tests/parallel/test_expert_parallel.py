"""Expert parallelism for training: the all-to-all dispatch equals the single-process MoE on the combined batch
(gloo, 2 and 4 processes)."""
import os

import pytest
import torch
import torch.distributed as dist

from ringlinear.backend import use_triton
from ringlinear.ops.moe import moe_experts, route
from ringlinear.parallel.expert import dispatch_experts
from ringlinear.testing import spawn_gloo

E, K, H, I = 8, 3, 16, 8


def _inputs(world, seed):
    """Every rank's tokens (different counts), one router and the full expert stacks, fp32."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(5 + 3 * r, H, generator=g) for r in range(world)]
    router = torch.randn(E, H, generator=g)
    bias = torch.randn(E, generator=g) * 0.1
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.3
    w2 = torch.randn(E, H, I, generator=g) * 0.3
    dys = [torch.randn(x.shape, generator=g) for x in xs]
    return xs, router, bias, w13, w2, dys


def _rank_dispatch(rank, world, seed):
    xs, router, bias, w13, w2, dys = _inputs(world, seed)
    El = E // world
    x = xs[rank].clone().requires_grad_()
    a = w13[rank * El:(rank + 1) * El].clone().requires_grad_()
    b = w2[rank * El:(rank + 1) * El].clone().requires_grad_()
    idx, w, _ = route(x, router, bias, K, 2, 1, 2.5)
    w = w.detach().requires_grad_()
    y = dispatch_experts(x, idx, w, a, b, dist.group.WORLD, E)
    (y * dys[rank]).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad, "dw13": a.grad, "dw2": b.grad}


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_equals_one_process(world):
    seed = 100 + world
    ranks = spawn_gloo(_rank_dispatch, world, seed)
    xs, router, bias, w13, w2, dys = _inputs(world, seed)
    x = torch.cat(xs).requires_grad_()
    a, b = w13.clone().requires_grad_(), w2.clone().requires_grad_()
    idx, w, _ = route(x, router, bias, K, 2, 1, 2.5)
    w = w.detach().requires_grad_()
    y = moe_experts(x, idx, w, a, b)
    (y * torch.cat(dys)).sum().backward()
    # Every expert sees the same rows in the same order (source rank, then token) as the single process on the
    # rank-ordered batch, so the expert GEMMs, their weight gradients and the fp32 slot-order combine are the same
    # arithmetic: bitwise equal. A token's dx sums its k slots' terms in another order (pair order vs expert
    # order): fp32 rounding (k = 3 here; with k = 2 the two-term sum is order-free and dx is bitwise too).
    assert torch.equal(torch.cat([r["y"] for r in ranks]), y.detach())
    for key, ref in (("dw", w.grad), ("dw13", a.grad), ("dw2", b.grad)):
        assert torch.equal(torch.cat([r[key] for r in ranks]), ref), key
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, rtol=1e-5, atol=1e-6)


def _rank_dispatch_triton(rank, world, seed):
    """The CUDA path (fused grouped GEMMs; interpreted on CPU) at kernel-sized shapes: H 64, E 16, I 32, top-4."""
    os.environ["RINGLINEAR_BACKEND"] = "triton"
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(6 + 5 * r, 64, generator=g) for r in range(world)]
    router = torch.randn(16, 64, generator=g) * 0.2
    w13, w2 = torch.randn(16, 64, 64, generator=g) * 0.125, torch.randn(16, 64, 32, generator=g) * 0.18
    dys = [torch.randn(x.shape, generator=g) for x in xs]
    El = 16 // world
    assert use_triton(xs[0])

    def run(x, a, b, dy, group):
        x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
        idx, w, _ = route(x, router, None, 4, 4, 2, 2.5)
        y = dispatch_experts(x, idx, w, a, b, group, 16) if group is not None else moe_experts(x, idx, w, a, b)
        (y * dy).sum().backward()
        return y.detach(), x.grad, a.grad, b.grad
    mine = run(xs[rank], w13[rank * El:(rank + 1) * El], w2[rank * El:(rank + 1) * El], dys[rank], dist.group.WORLD)
    whole = run(torch.cat(xs), w13, w2, torch.cat(dys), None) if rank == 0 else None
    return mine, whole


def test_dispatch_fused_kernels(monkeypatch):
    pytest.importorskip("triton")
    # the ranks are CPU processes over gloo: they interpret the kernels on a CUDA machine too
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ranks = spawn_gloo(_rank_dispatch_triton, 2, 9)
    whole = ranks[0][1]
    y, dx = torch.cat([r[0][0] for r in ranks]), torch.cat([r[0][1] for r in ranks])
    dw13, dw2 = torch.cat([r[0][2] for r in ranks]), torch.cat([r[0][3] for r in ranks])
    # the fused path's own combine vs the EP combine, and reduction orders: fp32 rounding (numerics.md: 1e-5)
    for got, want in zip((y, dx, dw13, dw2), whole):
        assert float((got - want).norm() / want.norm()) < 1e-5
