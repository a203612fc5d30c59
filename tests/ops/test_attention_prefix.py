"""The CUDA prefill path of softmax attention (SDPA in the model dtype, row-blocked bottom-right causal mask) on
CPU tensors against the fp32 reference: same function, so the GPU path's masking logic is checked in CI."""
import pytest
import torch

from ringlinear.backend import use_sdpa
from ringlinear.ops.attention import sdpa
from ringlinear.ops.attention.reference import attention_with_prefix


@pytest.mark.parametrize("tq,tk,blk", [(9, 9, 1 << 20), (17, 60, 1 << 20), (50, 130, 1000), (1, 40, 7)])
def test_sdpa_prefix_matches_reference(tq, tk, blk):
    g = torch.Generator().manual_seed(tq * 1000 + tk)
    q = torch.randn(tq, 8, 16, generator=g)
    k, v = torch.randn(tk, 2, 16, generator=g), torch.randn(tk, 2, 16, generator=g)
    ref = attention_with_prefix(q.double(), k.double(), v.double(), 0.3)
    got = sdpa.attention_with_prefix(q, k, v, 0.3, max_mask_elems=blk)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_sdpa_rule():
    x = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert not use_sdpa(x) and not use_sdpa(x.float())  # CPU: the fp32 reference


def _pieces(shapes, H, KV, D, seed, device="cpu", dtype=torch.float32):
    """Packed pieces: shapes [(Tq, Tk)] -> q [sum Tq, H, D], k, v [sum Tk, KV, D], cu_q, cu_k int32."""
    g = torch.Generator(device=device).manual_seed(seed)
    tq, tk = sum(a for a, _ in shapes), sum(b for _, b in shapes)
    q = torch.randn(tq, H, D, generator=g, device=device).to(dtype)
    k, v = (torch.randn(tk, KV, D, generator=g, device=device).to(dtype) for _ in range(2))
    cu_q = torch.tensor([0] + [sum(a for a, _ in shapes[:i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(b for _, b in shapes[:i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    return q, k, v, cu_q.to(device), cu_k.to(device)


def _masked_fp64(q, k, v, cu_q, cu_k, scale):
    """Independent spec: an explicit softmax per piece over keys 0..(Tk - Tq + i) for query i, in fp64."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for n in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[n]), int(cu_q[n + 1]), int(cu_k[n]), int(cu_k[n + 1])
        tq, tk = qe - qs, ke - ks
        s = torch.einsum("qhd,khd->hqk", q[qs:qe], k[ks:ke].repeat_interleave(rep, 1)) * scale
        allowed = torch.arange(tk)[None, :] <= (tk - tq + torch.arange(tq))[:, None]
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, v[ks:ke].repeat_interleave(rep, 1))
    return out


def test_packed_prefix_pieces_match_an_explicit_mask():
    from ringlinear.ops.attention import prefix_attention_varlen
    shapes = [(1, 40), (17, 60), (9, 9), (50, 130)]
    q, k, v, cu_q, cu_k = _pieces(shapes, 8, 2, 16, seed=5)
    got = prefix_attention_varlen(q, k, v, cu_q, cu_k, 0.3, max_q=50, max_k=130)
    want = _masked_fp64(q, k, v, cu_q, cu_k, 0.3)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    # one call equals the pieces one by one (bitwise on CPU: the same reference per piece)
    for n, (a, b) in enumerate(shapes):
        qs, ks = int(cu_q[n]), int(cu_k[n])
        assert torch.equal(got[qs:qs + a], attention_with_prefix(q[qs:qs + a], k[ks:ks + b], v[ks:ks + b], 0.3))
