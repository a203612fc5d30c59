"""Paged decode attention kernel (Triton, interpreter on CPU) vs the gather reference; batch invariance."""
import pytest
import torch

from ringlinear.ops.attention import reference as R


def _setup(lens, H=4, KV=2, D=16, bs=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // bs) for n in lens) + 3
    K = torch.randn(nblocks * bs, KV, D, generator=g).to(dtype)
    V = torch.randn(nblocks * bs, KV, D, generator=g).to(dtype)
    perm = torch.randperm(nblocks, generator=g).tolist()  # scattered, non-contiguous blocks
    MB = max(-(-n // bs) for n in lens)
    tables = torch.zeros(len(lens), MB, dtype=torch.int32)
    for i, n in enumerate(lens):
        nb = -(-n // bs)
        tables[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel itself on a GPU, the interpreter on CPU
    return (q.to(dev), K.to(dev), V.to(dev), tables.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev), bs)


@pytest.mark.parametrize("lens", [[1, 9, 600], [1100, 37]])
def test_paged_decode_matches_reference(lens):
    tri = pytest.importorskip("ringlinear.ops.attention.triton", reason="triton not installed")
    q, K, V, bt, cl, bs = _setup(lens, seed=len(lens))
    ref = R.paged_decode_attention(q.double().cpu(), K.double().cpu(), V.double().cpu(), bt.cpu(), cl.cpu(), bs, 0.25)
    out = tri.paged_decode_attention(q, K, V, bt, cl, bs, 0.25)
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < 1e-5


def test_paged_decode_batch_invariant():
    tri = pytest.importorskip("ringlinear.ops.attention.triton", reason="triton not installed")
    q, K, V, bt, cl, bs = _setup([700, 5, 130], seed=3)
    both = tri.paged_decode_attention(q, K, V, bt, cl, bs, 0.3)
    alone = tri.paged_decode_attention(q[:1], K, V, bt[:1, :], cl[:1], bs, 0.3)
    assert torch.equal(both[0], alone[0])
