"""Chunk-aligned lightning attention: training forward, prefill pieces and token-by-token decode give every position
the same bits; all equal the plain recurrence within fp32 rounding."""
import torch

from ringlinear.ops.lightning_attn import aligned as A
from ringlinear.ops.lightning_attn import reference as R

H, D = 4, 16


def _seq(lens, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(1, T, H, D, generator=g) for _ in range(3))
    gam = -torch.rand(H, generator=g) * 0.5
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    return q, k, v, gam, cu


def _serve(aligned_prefill, aligned_decode, q, k, v, gam, cu, prompt_lens, piece):
    """Prefill each sequence's prompt in pieces of `piece` tokens, then decode the rest one token per step with all
    sequences batched. Returns the outputs [T, H, D] in packed order."""
    lens = (cu[1:] - cu[:-1]).tolist()
    N = len(lens)
    state = torch.zeros(N + 1, H, D, D)
    ok, ov = torch.zeros(N + 1, A.C, H, D), torch.zeros(N + 1, A.C, H, D)
    out = torch.zeros(q.shape[1], H, D)
    for n in range(N):
        for s in range(0, prompt_lens[n], piece):
            e = min(prompt_lens[n], s + piece)
            a, b = int(cu[n]) + s, int(cu[n]) + e
            out[a:b] = aligned_prefill(q[:, a:b], k[:, a:b], v[:, a:b], gam, state, ok, ov, torch.tensor([n]),
                                       torch.tensor([0, e - s]), torch.tensor([s]))[0]
    for t in range(max(lens)):
        live = [n for n in range(N) if prompt_lens[n] <= t < lens[n]]
        if not live:
            continue
        rows = torch.tensor([int(cu[n]) + t for n in live])
        out[rows] = aligned_decode(q[0, rows], k[0, rows], v[0, rows], gam, state, ok, ov, torch.tensor(live),
                                   torch.full((len(live),), t))
    return out


def test_training_prefill_decode_bitwise():
    lens, prompts = [150, 64, 200], [70, 64, 1]
    q, k, v, gam, cu = _seq(lens, 0)
    train = A.lightning_attn_aligned(q, k, v, gam, cu_seqlens=cu)[0]
    for piece in (64, 128):
        served = _serve(A.lightning_attn_prefill_aligned, A.lightning_attn_decode_aligned, q, k, v, gam, cu,
                        prompts, piece)
        assert torch.equal(train, served)
    ref, _ = R.lightning_attn_recurrent(q.double(), k.double(), v.double(), gam.double(), cu_seqlens=cu)
    assert float((train.double() - ref[0]).norm() / ref.norm()) < 1e-5


def test_prefill_must_start_on_a_chunk_boundary():
    q, k, v, gam, cu = _seq([10], 1)
    st, ok, ov = torch.zeros(1, H, D, D), torch.zeros(1, A.C, H, D), torch.zeros(1, A.C, H, D)
    try:
        A.lightning_attn_prefill_aligned(q, k, v, gam, st, ok, ov, torch.tensor([0]), torch.tensor([0, 10]),
                                         torch.tensor([5]))
    except ValueError as e:
        assert "chunk boundary" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def _triton_fns():
    import pytest
    pytest.importorskip("triton")
    from ringlinear.ops.lightning_attn import triton as T
    from ringlinear.ops.lightning_attn import triton_aligned as TA
    return T, TA


def test_triton_training_prefill_decode_bitwise():
    """The kernels: training forward (aligned plan), prefill pieces and decode give every position the same bits."""
    T, TA = _triton_fns()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lens, prompts = [150, 64, 70], [70, 64, 1]
    q, k, v, gam, cu = _seq(lens, 3)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v = (x.to(dev, dt) for x in (q, k, v))
    gam, cu = gam.to(dev), cu.to(dev)
    train = T.lightning_attn(q, k, v, gam, cu_seqlens=cu, aligned=True)[0][0]
    BT = TA.open_chunk_rows(D, D, dt)
    N = len(lens)

    def prefill(q_, k_, v_, g_, st, ok, ov, slots, cu_, starts):
        return TA.lightning_attn_prefill_aligned(q_, k_, v_, g_, st, ok, ov, slots.to(dev), cu_.to(dev), starts)

    def decode(q_, k_, v_, g_, st, ok, ov, slots, pos):
        return TA.lightning_attn_decode_aligned(q_, k_, v_, g_, st, ok, ov, slots.to(dev), pos.to(dev))

    state = torch.zeros(N + 1, H, D, D, device=dev)
    ok, ov = (torch.zeros(N + 1, BT, H, D, device=dev, dtype=dt) for _ in range(2))
    out = torch.zeros(q.shape[1], H, D, device=dev, dtype=dt)
    for n in range(N):
        for s in range(0, prompts[n], 64):
            e = min(prompts[n], s + 64)
            a, b = int(cu[n]) + s, int(cu[n]) + e
            out[a:b] = prefill(q[:, a:b], k[:, a:b], v[:, a:b], gam, state, ok, ov, torch.tensor([n]),
                               torch.tensor([0, e - s]), torch.tensor([s]))[0]
    for t in range(max(lens)):
        live = [n for n in range(N) if prompts[n] <= t < lens[n]]
        if live:
            rows = torch.tensor([int(cu[n]) + t for n in live], device=dev)
            out[rows] = decode(q[0, rows], k[0, rows], v[0, rows], gam, state, ok, ov, torch.tensor(live),
                               torch.full((len(live),), t))
    assert torch.equal(train, out)
    ref, _ = R.lightning_attn_recurrent(q.double(), k.double(), v.double(), gam.double(), cu_seqlens=cu)
    tol = 1e-5 if dt == torch.float32 else 5e-3
    assert float((train.double() - ref[0]).norm() / ref.norm()) < tol
