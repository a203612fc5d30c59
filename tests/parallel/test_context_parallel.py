"""Context parallelism: lightning attention and causal softmax attention over a sequence split across gloo
processes equal the single-process op (outputs and q/k/v gradients).

The packed step has documents that start inside a piece, one that runs through whole pieces (state carried over
several ranks) and one that starts exactly at a piece boundary (nothing carried)."""
import os

import pytest
import torch
import torch.distributed as dist

from ringlinear.backend import use_triton
from ringlinear.ops.attention.reference import causal_attention_varlen
from ringlinear.ops.lightning_attn import reference as ref
from ringlinear.parallel.context import carry_weights, cp_causal_attention, cp_lightning_attn, split_pieces
from ringlinear.testing import spawn_gloo

CU = [0, 10, 72, 90, 96]  # T = 96: pieces of 48 (cp 2) or 24 (cp 4); doc 2 spans ranks 0..2 of 4, doc 3 starts at 72


def _inputs(T, H, D, KV, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    sk, sv = (torch.randn(T, KV, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    do = torch.randn(T, H, D, generator=g, dtype=torch.float64).to(dtype)
    gamma = -torch.tensor([0.02, 0.3, 1.0, 0.1][:H])  # fp32 log decays, as the model keeps them
    return q, k, v, sk, sv, do, gamma


def _rank(rank, world, cu, shape, dtype, seed, backend):
    os.environ["RINGLINEAR_BACKEND"] = backend
    T, H, D, KV, chunk = shape
    q, k, v, sk, sv, do, gamma = _inputs(T, H, D, KV, dtype, seed)
    assert use_triton(q) == (backend == "triton")
    pieces = split_pieces(cu, T, world)
    p = pieces[rank]
    sl = slice(p.lo, p.hi)
    ql, kl, vl = (x[sl].clone().requires_grad_() for x in (q, k, v))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    o = cp_lightning_attn(ql, kl, vl, gamma, D ** -0.5, torch.tensor(p.cu), carry_weights(pieces, rank, gamma, acc),
                          dist.group.WORLD, chunk_size=chunk)
    (o * do[sl]).sum().backward()
    out = {"o": o.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    sq = q[sl].clone().requires_grad_()
    skl, svl = (x[sl].clone().requires_grad_() for x in (sk, sv))
    so = cp_causal_attention(sq, skl, svl, D ** -0.5, p, dist.group.WORLD)
    (so * do[sl]).sum().backward()
    out.update(so=so.detach(), sdq=sq.grad, sdk=skl.grad, sdv=svl.grad)
    return out


def _single(cu, shape, dtype, seed):
    """The one-process results, from the fp64 reference (the same rounded inputs)."""
    T, H, D, KV, chunk = shape
    q, k, v, sk, sv, do, gamma = (x.double() for x in _inputs(T, H, D, KV, dtype, seed))
    q, k, v, sk, sv = (x.requires_grad_() for x in (q, k, v, sk, sv))
    o, _ = ref.lightning_attn(q[None], k[None], v[None], gamma, scale=D ** -0.5, cu_seqlens=torch.tensor(cu),
                              chunk_size=chunk)
    dq, dk, dv = torch.autograd.grad((o[0] * do).sum(), (q, k, v))
    so = causal_attention_varlen(q, sk, sv, torch.tensor(cu), D ** -0.5)
    sdq, sdk, sdv = torch.autograd.grad((so * do).sum(), (q, sk, sv))
    return {"o": o[0], "dq": dq, "dk": dk, "dv": dv, "so": so, "sdq": sdq, "sdk": sdk, "sdv": sdv}


def _check(ranks, single, tol):
    for key, want in single.items():
        got = torch.cat([r[key] for r in ranks]).double()
        err = float((got - want.detach()).norm() / want.detach().norm())
        assert err < tol, (key, err)


@pytest.mark.parametrize("world", [2, 4])
def test_cp_equals_one_process_fp64(world):
    """fp64: the carried states are the exact decayed sums (only the chunking differs): equal to fp64 rounding."""
    shape = (96, 2, 8, 1, 16)
    ranks = spawn_gloo(_rank, world, CU, shape, torch.float64, 7 + world, "torch")
    _check(ranks, _single(CU, shape, torch.float64, 7 + world), 1e-12)


def test_cp_fp32_reference_path():
    shape = (96, 2, 8, 1, 16)
    ranks = spawn_gloo(_rank, 4, CU, shape, torch.float32, 3, "torch")
    _check(ranks, _single(CU, shape, torch.float32, 3), 1e-5)


def test_cp_triton_kernels(monkeypatch):
    """The GPU path (Triton lightning kernels, interpreted: autograd through the initial and final states) at a
    kernel-sized head dim; fp32, tolerance of docs/numerics.md (1e-5 relative to fp64). The ranks are CPU
    processes over gloo, so they interpret the kernels on a CUDA machine too (one GPU cannot hold two NCCL ranks;
    the multi-GPU run is benchmarks/multi_gpu.py)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the freshly spawned ranks
    cu = [0, 40, 128]
    shape = (128, 2, 32, 1, 64)
    ranks = spawn_gloo(_rank, 2, cu, shape, torch.float32, 5, "triton")
    single = _single(cu, shape, torch.float32, 5)
    _check(ranks, {k: v for k, v in single.items() if not k.startswith("s")}, 1e-5)


def test_split_pieces_and_carry():
    pieces = split_pieces(CU, 96, 4)
    assert [(p.lo, p.hi, p.cu, p.doc_start, p.continues, p.single) for p in pieces] == [
        (0, 24, [0, 10, 24], 0, False, False), (24, 48, [0, 24], 10, True, True),
        (48, 72, [0, 24], 10, True, True), (72, 96, [0, 18, 24], 72, False, False)]
    g = torch.tensor([-0.5], dtype=torch.float64)
    assert carry_weights(pieces, 2, g, torch.float64)[:, 0].tolist() == [torch.exp(g * 24).item(), 1.0, 0.0, 0.0]
    assert not carry_weights(pieces, 3, g, torch.float64).any()  # document 3 starts at rank 3's first token
    with pytest.raises(ValueError, match="divisible by 4"):
        split_pieces([0, 10], 10, 4)
