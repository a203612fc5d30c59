"""Fixed-order ("aligned") softmax attention: the reference equals plain causal attention (fp64); a query row has
the same bits whether computed in a training call over packed documents, in prefill pieces over paged blocks or
one token at a time in decode batches (reference on CPU; Triton kernels under the interpreter, or compiled on a
GPU); the Triton forward and backward agree with the reference."""
import pytest
import torch

from ringlinear.ops.attention import reference as R
from ringlinear.ops.attention.aligned import aligned_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, KV, D, BS = 4, 2, 16, 8


def _docs(lens, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype) for h in (H, KV, KV))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    return q, k, v, cu


def _paged(k, v, cu, seed):
    """Scatter each document's keys into shuffled blocks of a flat cache -> (K, V, block_tables)."""
    g = torch.Generator().manual_seed(seed)
    lens = (cu[1:] - cu[:-1]).tolist()
    nblk = sum(-(-n // BS) for n in lens) + 2
    perm = torch.randperm(nblk, generator=g).tolist()
    K = torch.randn(nblk * BS, KV, D, generator=g).to(k.dtype)  # garbage where nothing is written
    V = torch.randn(nblk * BS, KV, D, generator=g).to(k.dtype)
    MB = max(-(-n // BS) for n in lens)
    bt = torch.zeros(len(lens), MB, dtype=torch.int32)
    for i, n in enumerate(lens):
        blocks = [perm.pop() for _ in range(-(-n // BS))]
        bt[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(n)
        rows = bt[i].long()[pos // BS] * BS + pos % BS
        K[rows], V[rows] = k[cu[i]:cu[i + 1]], v[cu[i]:cu[i + 1]]
    return K, V, bt


def test_reference_is_causal_attention_fp64():
    q, k, v, cu = _docs([1, 64, 65, 200], 0, torch.float64)
    o = aligned_attention(q, k, v, cu, torch.zeros(4, dtype=torch.long), 0.3, k_cu=cu)
    ref = R.causal_attention_varlen(q, k, v, cu, 0.3)
    assert (o - ref).abs().max() < 1e-12


def _three_ways(attn, q, k, v, cu, **kw):
    """(training call, prefill in pieces of 48 over paged keys, decode token by token with other sequences)."""
    lens = (cu[1:] - cu[:-1]).tolist()
    N = len(lens)
    train = attn(q, k, v, cu, torch.zeros(N, dtype=torch.long), 0.3, k_cu=cu, **kw)
    K, V, bt = _paged(k, v, cu, 1)
    pieces = torch.empty_like(q)
    for i in range(N):
        for s in range(0, lens[i], 48):
            e = min(lens[i], s + 48)
            rows = slice(int(cu[i]) + s, int(cu[i]) + e)
            pieces[rows] = attn(q[rows], K, V, torch.tensor([0, e - s]), torch.tensor([s]), 0.3,
                                block_tables=bt[i:i + 1], block_size=BS, **kw)
    decode = torch.empty_like(q)
    for t in range(max(lens)):  # step t: every sequence still that long decodes its token t, in one batch
        live = [i for i in range(N) if t < lens[i]]
        rows = torch.tensor([int(cu[i]) + t for i in live])
        out = attn(q[rows], K, V, torch.arange(len(live) + 1), torch.full((len(live),), t), 0.3,
                   block_tables=bt[live], block_size=BS, **kw)
        decode[rows] = out
    return train, pieces, decode


def test_reference_rows_bitwise_across_call_shapes():
    q, k, v, cu = _docs([3, 70, 130], 2)
    train, pieces, decode = _three_ways(aligned_attention, q, k, v, cu)
    assert torch.equal(train, pieces) and torch.equal(train, decode)
    assert (train.double() - R.causal_attention_varlen(q.double(), k.double(), v.double(), cu, 0.3)).abs().max() < 1e-5


def _triton_attn(q, K, V, q_cu, q_start, scale, k_cu=None, block_tables=None, block_size=1):
    from ringlinear.ops.attention.triton_aligned import aligned_forward
    max_q = int((q_cu[1:] - q_cu[:-1]).max())
    o, _ = aligned_forward(q.to(DEV), K.to(DEV), V.to(DEV), q_cu.to(DEV), q_start.to(DEV), scale, max_q,
                           k_cu=None if k_cu is None else k_cu.to(DEV),
                           block_tables=None if block_tables is None else block_tables.to(DEV),
                           block_size=block_size)
    return o.cpu()


def test_triton_forward_matches_reference_and_is_row_invariant():
    pytest.importorskip("triton")
    q, k, v, cu = _docs([5, 64, 90], 3)
    train, pieces, decode = _three_ways(_triton_attn, q, k, v, cu)
    ref = aligned_attention(q, k, v, cu, torch.zeros(3, dtype=torch.long), 0.3, k_cu=cu)
    assert float((train - ref).norm() / ref.norm()) < 1e-5
    assert torch.equal(train, pieces) and torch.equal(train, decode)


def test_triton_backward_matches_reference():
    pytest.importorskip("triton")
    from ringlinear.ops.attention.triton_aligned import aligned_causal_varlen
    q, k, v, cu = _docs([7, 100, 66], 4)
    qs, ks, vs = (x.to(DEV).requires_grad_() for x in (q, k, v))
    o = aligned_causal_varlen(qs, ks, vs, cu.to(DEV), 0.3, 100)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(9)).to(DEV)
    grads = torch.autograd.grad(o, (qs, ks, vs), do)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = R.causal_attention_varlen(qd, kd, vd, cu, 0.3)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd), do.double().cpu())
    assert float((o.detach().cpu().double() - ref.detach()).norm() / ref.detach().norm()) < 1e-5
    for a, b in zip(grads, rgrads):
        assert float((a.cpu().double() - b).norm() / b.norm()) < 1e-5
