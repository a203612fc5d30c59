"""Lightning-attention Triton kernels against the reference (CPU: Triton interpreter at small shapes; CUDA:
compiled kernels).

Tolerances from docs/numerics.md, relative to an fp64 reference on the same (rounded) inputs: fp32 inputs
1e-5 for outputs, gradients and final states; bf16 inputs 5e-3 (output), 1e-2 (gradients), 1e-3 (final state).
Every check uses fresh random inputs, a random initial state and a random final-state gradient, so a kernel that
drops any term fails. Long-sequence splitting is forced with TUNE["segment"] so the CPU run covers it too.
"""
import pytest
import torch

pytest.importorskip("triton")

from ringlinear.ops import lightning_attn as dispatch  # noqa: E402
from ringlinear.ops.lightning_attn import reference as ref  # noqa: E402
from ringlinear.ops.lightning_attn import triton as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF16_TOL = dict(o=5e-3, state=1e-3, grad=1e-2)
FP32_TOL = dict(o=1e-5, state=1e-5, grad=1e-5)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _clean_tune():
    tri.TUNE.clear()
    yield
    tri.TUNE.clear()


def rand(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEV, dtype=dtype)


def run_and_compare(B, T, H, D, dtype=torch.float32, cu=None, seed=0, segment=None, tol=FP32_TOL):
    """Forward + backward (o, final state, with an initial state) against autograd through the fp64 reference."""
    if segment:
        tri.TUNE["segment"] = segment
    gen = torch.Generator().manual_seed(seed)
    N = B if cu is None else len(cu) - 1
    cut = None if cu is None else torch.tensor(cu, device=DEV)
    q, k, v = (rand(B, T, H, D, gen=gen, dtype=dtype).requires_grad_() for _ in range(3))
    h0 = rand(N, H, D, D, gen=gen).requires_grad_()
    g = -torch.rand(H, generator=gen).to(DEV)  # log decays in (-1, 0]
    o, ht = tri.lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cut)
    do, dht = rand(*o.shape, gen=gen, dtype=dtype), rand(*ht.shape, gen=gen)
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), (q, k, v, h0))
    xs = [x.detach().double().requires_grad_() for x in (q, k, v, h0)]
    ro, rht = ref.lightning_attn(*xs[:3], g.double(), initial_state=xs[3], output_final_state=True,
                                 cu_seqlens=cut)
    rgrads = torch.autograd.grad((ro * do.double()).sum() + (rht * dht.double()).sum(), xs)
    assert o.dtype == dtype and ht.dtype == torch.float32 and o.shape == ro.shape
    assert rel(o, ro) < tol["o"], rel(o, ro)
    assert rel(ht, rht) < tol["state"], rel(ht, rht)
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), grads, rgrads):
        assert a.dtype == (dtype if name != "dh0" else torch.float32)
        assert rel(a, b) < tol["grad"], (name, rel(a, b))


@pytest.mark.parametrize("D", [32, 64, 128])
def test_fwd_bwd_final_state(D):
    run_and_compare(2, 83, 2, D, seed=D)  # 83: a partial last chunk


def test_bf16_budgets():
    run_and_compare(2, 150, 2, 64, dtype=torch.bfloat16, tol=BF16_TOL, seed=5)


@pytest.mark.parametrize("segment", [None, 64])
def test_varlen_uneven(segment):
    # an empty sequence, a one-token one, and lengths that are not chunk multiples; with segment=64 the long
    # ones are split and stitched by the segment scan
    run_and_compare(1, 230, 2, 32, cu=[0, 1, 1, 97, 230], segment=segment, seed=7)


def test_split_regular_batch():
    run_and_compare(2, 200, 1, 64, segment=64, seed=11)


def test_no_state_no_grad_inputs():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (rand(1, 70, 2, 32, gen=gen) for _ in range(3))
    g = -torch.rand(2, generator=gen).to(DEV)
    o, ht = tri.lightning_attn(q, k, v, g)
    assert ht is None
    assert rel(o, ref.lightning_attn(q.double(), k.double(), v.double(), g.double())[0]) < 1e-5


def test_strided_qkv_views_and_scale():
    # q, k, v as head-slices of one fused projection output, the layout the model produces
    gen = torch.Generator().manual_seed(4)
    qkv = rand(2, 50, 3 * 2, 32, gen=gen)
    q, k, v = qkv[:, :, :2], qkv[:, :, 2:4], qkv[:, :, 4:]
    g = -torch.rand(2, generator=gen).to(DEV)
    o, _ = tri.lightning_attn(q, k, v, g, scale=0.3)
    ro, _ = ref.lightning_attn(q.double(), k.double(), v.double(), g.double(), scale=0.3)
    assert rel(o, ro) < 1e-5


def test_deterministic():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand(1, 90, 2, 32, gen=gen) for _ in range(3))
    g = -torch.rand(2, generator=gen).to(DEV)
    a = tri.lightning_attn(q, k, v, g, output_final_state=True)
    b = tri.lightning_attn(q, k, v, g, output_final_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("segment", [None, 64])
def test_prefill_from_slots(segment):
    if segment:
        tri.TUNE["segment"] = segment
    gen = torch.Generator().manual_seed(12)
    H, D, S = 2, 32, 6
    cu = torch.tensor([0, 40, 41, 170], device=DEV)
    slots = torch.tensor([4, 0, 2], device=DEV)
    q, k, v = (rand(1, 170, H, D, gen=gen) for _ in range(3))
    g = -torch.rand(H, generator=gen).to(DEV)
    pool = rand(S, H, D, D, gen=gen)
    p1, p2 = pool.clone(), pool.clone().double()
    o = tri.lightning_attn_prefill(q, k, v, g, p1, slots, cu)
    ro = ref.lightning_attn_prefill(q.double(), k.double(), v.double(), g.double(), p2, slots, cu)
    assert rel(o, ro) < 1e-5
    assert rel(p1, p2) < 1e-5
    untouched = [1, 3, 5]
    assert torch.equal(p1[untouched], pool[untouched])


@pytest.mark.parametrize("D", [32, 64, 128])
def test_decode_slots_in_place(D):
    gen = torch.Generator().manual_seed(D + 1)
    N, H, S = 3, 2, 5
    pool = rand(S, H, D, D, gen=gen)
    slots = torch.tensor([3, 0, 4], device=DEV)
    g = -torch.rand(H, generator=gen).to(DEV)
    p1, p2 = pool.clone(), pool.clone().double()
    out = torch.full((N, H, D), float("nan"), device=DEV)  # poisoned: every element must be written
    for step in range(3):  # consecutive steps read what the last one wrote
        q, k, v = (rand(N, H, D, gen=gen) for _ in range(3))
        o = tri.lightning_attn_decode(q, k, v, g, p1, slots, out=out)
        ro = ref.lightning_attn_decode(q.double(), k.double(), v.double(), g.double(), p2, slots)
        assert o.data_ptr() == out.data_ptr()
        assert rel(o, ro) < 1e-5, step
    assert rel(p1, p2) < 1e-5
    assert torch.equal(p1[[1, 2]], pool[[1, 2]])


def test_decode_bf16_default_slots():
    gen = torch.Generator().manual_seed(21)
    N, H, D = 4, 2, 64
    pool = rand(N, H, D, D, gen=gen)
    q, k, v = (rand(N, H, D, gen=gen, dtype=torch.bfloat16) for _ in range(3))
    g = -torch.rand(H, generator=gen).to(DEV)
    p1, p2 = pool.clone(), pool.clone().double()
    o = tri.lightning_attn_decode(q, k, v, g, p1)
    ro = ref.lightning_attn_decode(q.double(), k.double(), v.double(), g.double(), p2)
    assert o.dtype == torch.bfloat16
    assert rel(o, ro) < 5e-3 and rel(p1, p2) < 1e-5


def test_dispatch_uses_triton(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    gen = torch.Generator().manual_seed(30)
    q, k, v = (rand(1, 40, 2, 32, gen=gen) for _ in range(3))
    g = -torch.rand(2, generator=gen).to(DEV)
    tri.TUNE["segment"] = 64  # marks the call: only the Triton path reads TUNE
    a = dispatch.lightning_attn(q, k, v, g, output_final_state=True)
    b = tri.lightning_attn(q, k, v, g, output_final_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    c = dispatch.lightning_attn(q, k, v, g, output_final_state=True)
    assert rel(c[0], a[0]) < 1e-5


def test_prefill_plans_reused_across_layers():
    """The engine keeps one launch plan per step for all its linear layers (`plans=`): the plan is built once,
    and each layer's output and state equal a call that builds its own, bit for bit (split segments forced)."""
    tri.TUNE["segment"] = 64
    gen = torch.Generator().manual_seed(13)
    H, D = 2, 32
    cu = torch.tensor([0, 150, 151, 230], device=DEV, dtype=torch.int32)
    slots = torch.tensor([2, 0, 1], device=DEV, dtype=torch.int32)
    plans = {}
    for layer in range(2):
        q, k, v = (rand(1, 230, H, D, gen=gen) for _ in range(3))
        g = -torch.rand(H, generator=gen).to(DEV)
        pool = rand(4, H, D, D, gen=gen)
        p1, p2 = pool.clone(), pool.clone()
        o1 = tri.lightning_attn_prefill(q, k, v, g, p1, slots, cu, plans=plans)
        o2 = tri.lightning_attn_prefill(q, k, v, g, p2, slots, cu)
        assert torch.equal(o1, o2) and torch.equal(p1, p2)
        assert len(plans) == 1 and next(iter(plans.values())).split


def test_segmented_prefill_with_empty_sequences():
    """segmented=True (the CUDA-graph prefill): segments whatever the sequence count, empty sequences among the
    live ones (unused piece slots) leave their slot's state as it was."""
    gen = torch.Generator().manual_seed(13)
    H, D, S = 2, 32, 7
    cu = torch.tensor([0, 40, 40, 41, 700, 700], device=DEV)
    slots = torch.tensor([4, 1, 0, 2, 6], device=DEV)
    q, k, v = (rand(1, 700, H, D, gen=gen) for _ in range(3))
    g = -torch.rand(H, generator=gen).to(DEV)
    pool = rand(S, H, D, D, gen=gen)
    p1, p2 = pool.clone(), pool.clone().double()
    plans = {}
    o = tri.lightning_attn_prefill(q, k, v, g, p1, slots, cu, segmented=True, plans=plans)
    (plan,) = plans.values()
    assert plan.split and plan.L < 700  # the long sequence really is cut (unsegmented, 4 sequences would not be)
    ro = ref.lightning_attn_prefill(q.double(), k.double(), v.double(), g.double(), p2, slots, cu)
    assert rel(o, ro) < 1e-5 and rel(p1, p2) < 1e-5
    assert torch.allclose(p1[[1, 6]], pool[[1, 6]], rtol=0, atol=1e-6)  # the empty sequences' slots
    assert torch.equal(p1[[3, 5]], pool[[3, 5]])                        # slots nobody named


def test_tune_unsplit_keeps_whole_sequences_in_training():
    """The tuning key the benchmark uses to time whole sequences against the split: it must reach the plan."""
    args = (2, 1024, 2, 32, 32, None, torch.device(DEV), torch.float32)
    assert tri._Plan(*args, training=True).split  # few programs: training splits
    tri.TUNE["unsplit"] = True
    assert not tri._Plan(*args, training=True).split
    run_and_compare(2, 1024, 2, 32)  # and the whole-sequence path still matches the reference


def test_split_fills_at_most_the_program_target(monkeypatch):
    """Equal-length training batches are cut into equal segments, as many as fit the program target but no more:
    one segment too many per sequence starts a nearly empty extra wave (H200, T=16K, B=4: 2.53 ms vs 2.36)."""
    monkeypatch.setattr(tri, "_sms", lambda device: 132)  # an H200's SMs (target 528), so the plans are the card's
    for B, T, H in [(4, 16384, 16), (1, 65536, 16), (2, 32768, 16), (1, 131072, 16), (2, 8192, 16)]:
        plan = tri._Plan(B, T, H, 128, 128, None, torch.device(DEV), torch.bfloat16, training=True)
        per_seq = H * (128 // plan.fwd[1])
        segs = -(-T // plan.L)
        assert plan.split and plan.L % tri.SEG_ALIGN == 0, (B, T, H, plan.L)
        assert B * per_seq * segs <= 528 < B * per_seq * (segs + 1), (B, T, H, plan.L, segs)
        assert segs * plan.L - T < plan.L // 2 + tri.SEG_ALIGN  # no short tail segment
