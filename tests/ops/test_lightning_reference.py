"""Reference lightning attention: chunked form == recurrent form (fp64, rel < 1e-10), states, varlen, slots."""
import pytest
import torch

from ringlinear.ops.lightning_attn import reference as R


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_equals_recurrent_fp64(chunk):
    B, T, H, D = 2, 53, 3, 8
    q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
    g = -torch.rand(H) * 0.7 - 0.01
    s0 = rand(B, H, D, D)
    o_r, f_r = R.lightning_attn_recurrent(q, k, v, g, initial_state=s0, output_final_state=True)
    o_c, f_c = R.lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk)
    assert rel(o_c, o_r) < 1e-10 and rel(f_c, f_r) < 1e-10


def test_recurrent_matches_parallel_definition():
    """Independent check of the recurrence: o_t = scale * sum_{s<=t} lam^(t-s) (q_t . k_s) v_s."""
    T, H, D = 9, 2, 4
    q, k, v = rand(1, T, H, D), rand(1, T, H, D), rand(1, T, H, D)
    g = -torch.rand(H) - 0.05
    o, _ = R.lightning_attn_recurrent(q, k, v, g)
    lam = torch.exp(g.double())
    ref = torch.zeros(T, H, D, dtype=torch.float64)
    for t in range(T):
        for s in range(t + 1):
            w = lam ** (t - s) * (q[0, t] * k[0, s]).sum(-1)  # [H]
            ref[t] += w[:, None] * v[0, s]
    assert rel(o[0], ref * D ** -0.5) < 1e-12


@pytest.mark.parametrize("chunk", [4, 64])
def test_state_carried_across_calls(chunk):
    T, H, D = 40, 2, 8
    q, k, v = rand(1, T, H, D), rand(1, T, H, D), rand(1, T, H, D)
    g = -torch.rand(H) * 0.3
    o_full, f_full = R.lightning_attn(q, k, v, g, output_final_state=True, chunk_size=chunk)
    cut = 17
    o1, f1 = R.lightning_attn(q[:, :cut], k[:, :cut], v[:, :cut], g, output_final_state=True, chunk_size=chunk)
    o2, f2 = R.lightning_attn(q[:, cut:], k[:, cut:], v[:, cut:], g, initial_state=f1, output_final_state=True,
                              chunk_size=chunk)
    assert rel(torch.cat([o1, o2], 1), o_full) < 1e-10 and rel(f2, f_full) < 1e-10


@pytest.mark.parametrize("chunk", [3, 16])
def test_packed_varlen_no_leak(chunk):
    lens = [5, 1, 23, 12]
    H, D = 2, 8
    g = -torch.rand(H) * 0.5
    seqs = [(rand(1, n, H, D), rand(1, n, H, D), rand(1, n, H, D)) for n in lens]
    s0 = rand(len(lens), H, D, D)
    q, k, v = (torch.cat([s[i] for s in seqs], 1) for i in range(3))
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(lens), 0)))
    o, f = R.lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=chunk)
    for n, (qs, ks, vs) in enumerate(seqs):
        o_n, f_n = R.lightning_attn_recurrent(qs, ks, vs, g, initial_state=s0[n:n + 1], output_final_state=True)
        assert rel(o[:, cu[n]:cu[n + 1]], o_n) < 1e-10
        assert rel(f[n], f_n[0]) < 1e-10


def test_decode_and_prefill_slots_match_recurrence():
    H, D, S = 3, 8, 6
    g = -torch.rand(H) * 0.5
    pool = rand(S, H, D, D)
    lens, slots = [4, 7], torch.tensor([5, 2])
    seqs = [(rand(1, n, H, D), rand(1, n, H, D), rand(1, n, H, D)) for n in lens]
    q, k, v = (torch.cat([s[i] for s in seqs], 1) for i in range(3))
    cu = torch.tensor([0, 4, 11])
    before = pool.clone()
    o = R.lightning_attn_prefill(q, k, v, g, pool, slots, cu, chunk_size=3)
    for n, (qs, ks, vs) in enumerate(seqs):
        o_n, f_n = R.lightning_attn_recurrent(qs, ks, vs, g, initial_state=before[slots[n]][None],
                                              output_final_state=True)
        assert rel(o[:, cu[n]:cu[n + 1]], o_n) < 1e-10 and rel(pool[slots[n]], f_n[0]) < 1e-10
    untouched = [i for i in range(S) if i not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched])
    # one decode step on slots 2 and 5
    qd, kd, vd = rand(2, H, D), rand(2, H, D), rand(2, H, D)
    ref_state = pool.clone()
    od = R.lightning_attn_decode(qd, kd, vd, g, pool, slot_ids=torch.tensor([2, 5]))
    for j, s in enumerate([2, 5]):
        o_r, f_r = R.lightning_attn_recurrent(qd[j][None, None], kd[j][None, None], vd[j][None, None], g,
                                              initial_state=ref_state[s][None], output_final_state=True)
        assert rel(od[j], o_r[0, 0]) < 1e-12 and rel(pool[s], f_r[0]) < 1e-12


def test_bad_shapes_raise():
    q = rand(1, 4, 2, 8)
    with pytest.raises(ValueError, match="g_gamma"):
        R.lightning_attn(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        R.lightning_attn(q, q, q, -torch.ones(2), cu_seqlens=torch.tensor([0, 3]))
