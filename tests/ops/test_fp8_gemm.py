"""Blockwise-scaled FP8 GEMMs against the fp32 GEMM of their dequantised operands (tight: the same products, only
the summation differs: 1e-5 relative under the interpreter's fp32 sums; 5e-4 on the GPU, where the FP8 tensor cores
add each 128-long K block in a narrower accumulator than fp32 (DeepSeek-V3 report, section 3.3.2) before the kernel
scales it into its fp32 sum; measured 1.27e-4 on an H200 for our Triton GEMMs and cuBLAS alike) and against the bf16 GEMM of the unquantised operands (loose:
the recipe's own error, e4m3 on both operands ~3.7% relative RMS, bound 6%). Grouped kernels run over the fused
MoE's expert-sorted plan; dense layers are its one-expert case. Determinism and batch invariance are bitwise.
"""
import pytest
import torch

pytest.importorskip("triton")

from ringlinear.ops.fp8 import reference as R  # noqa: E402
from ringlinear.ops.fp8 import triton_gemm as TG  # noqa: E402
from ringlinear.ops.fp8 import triton_quant as TQ  # noqa: E402
from ringlinear.ops.moe.triton_route import make_plan  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TIGHT = 5e-4 if DEV == "cuda" else 1e-5
N, K_TOP, E, H, INTER = 48, 2, 4, 256, 128


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cnt():
    return torch.zeros(1, dtype=torch.int64, device=DEV)


def wq(w):
    *lead, n, k = w.shape
    out = (torch.empty(*lead, n, k, dtype=R.E4M3, device=DEV), torch.empty(*lead, n // 128, k // 128, device=DEV),
           torch.empty(*lead, k, n, dtype=R.E4M3, device=DEV), torch.empty(*lead, k // 128, n // 128, device=DEV))
    TQ.quantize_weight_into(w, *out, False, cnt())
    return out


@pytest.fixture(scope="module")
def moe():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g).to(torch.bfloat16).to(DEV)
    w13 = (torch.randn(E, 2 * INTER, H, generator=g) * H ** -0.5).to(DEV)
    w2 = (torch.randn(E, H, INTER, generator=g) * INTER ** -0.5).to(DEV)
    idx = torch.stack([torch.randperm(E, generator=g)[:K_TOP] for _ in range(N)]).to(DEV)
    wt = torch.rand(N, K_TOP, generator=g).to(DEV)
    pair, eoff = make_plan(idx, E)
    rp, re = R.plan(idx, E)
    (xq, xs), _ = TQ.quantize(x, R.E4M3, False, cnt())
    return dict(x=x, w13=w13, w2=w2, idx=idx, wt=wt, pair=pair, eoff=eoff, rp=rp, re=re, xq=xq, xs=xs,
                w13q=wq(w13), w2q=wq(w2))


def per_expert(re, fn, out):
    for e in range(E):
        r0, r1 = int(re[e]), int(re[e + 1])
        fn(e, r0, r1, out)
    return out


def test_gateup_against_dequantised_reference(moe):
    m = moe
    ab, (hq, hs), (hqt, hst) = TG.gateup(m["xq"], m["xs"], m["w13q"][0], m["w13q"][1], m["pair"], m["eoff"],
                                         K_TOP, torch.float32, True, False, cnt())
    X = R.dequantize_rows(m["xq"], m["xs"])[m["rp"] // K_TOP]
    W = R.dequantize_weight(m["w13q"][0], m["w13q"][1])
    ref = per_expert(m["re"], lambda e, r0, r1, o: o.__setitem__(slice(r0, r1), X[r0:r1] @ W[e].t()),
                     torch.empty(ab.shape, device=DEV))
    assert rel(ab, ref) < TIGHT
    h32 = R.swiglu32(ab)
    rq, rs = R.quantize_rows(h32)
    assert (R.dequantize_rows(hq, hs) - h32).abs().max() <= 2 ** -4 * h32.abs().max()
    assert (hq.view(torch.uint8) == rq.view(torch.uint8)).float().mean() > 0.99  # sigmoid differs in the last ulp
    cq, cs = R.quantize_sorted_cols(h32, m["re"])
    assert rel(R.dequantize_sorted_cols(hqt, hst, m["re"]), R.dequantize_sorted_cols(cq, cs, m["re"])) < 1e-2


def test_rows_gemm_tight_and_loose(moe):
    m = moe
    h = torch.randn(N * K_TOP, INTER, device=DEV)
    (hq, hs), _ = TQ.quantize(h, R.E4M3, False, cnt())
    o = torch.empty(N * K_TOP, H, device=DEV)
    TG.rows_gemm(hq, hs, m["w2q"][0], m["w2q"][1], m["pair"], m["eoff"], K_TOP, o, a_gather=False)
    Hd = R.dequantize_rows(hq, hs)
    W2 = R.dequantize_weight(m["w2q"][0], m["w2q"][1])
    rp = m["rp"]
    ref = per_expert(m["re"], lambda e, r0, r1, out: out.__setitem__(rp[r0:r1], Hd[r0:r1] @ W2[e].t()),
                     torch.empty_like(o))
    exact = per_expert(m["re"], lambda e, r0, r1, out: out.__setitem__(rp[r0:r1], (
        h[r0:r1].to(torch.bfloat16) @ m["w2"][e].to(torch.bfloat16).t()).float()), torch.empty_like(o))
    assert rel(o, ref) < TIGHT
    assert rel(o, exact) < 0.06


def test_dense_gemm_one_expert_plan():
    g = torch.Generator().manual_seed(1)
    T, Kd, Nd = 200, 384, 256
    x = torch.randn(T, Kd, generator=g).to(DEV)
    w = (torch.randn(Nd, Kd, generator=g) * 0.05).to(DEV)
    (xq, xs), _ = TQ.quantize(x, R.E4M3, False, cnt())
    q, s, _, _ = wq(w)
    pair, eoff = TG.identity_plan(T, x.device)
    y = TG.rows_gemm(xq, xs, q[None], s[None], pair, eoff, 1, torch.empty(T, Nd, device=DEV), a_gather=False)
    assert rel(y, R.dequantize_rows(xq, xs) @ R.dequantize_weight(q, s).t()) < TIGHT
    assert rel(y, (x.to(torch.bfloat16) @ w.to(torch.bfloat16).t()).float()) < 0.06


def test_dswiglu_and_weight_gradients(moe):
    m = moe
    gdt = R.E5M2
    ab, _, _ = TG.gateup(m["xq"], m["xs"], m["w13q"][0], m["w13q"][1], m["pair"], m["eoff"], K_TOP,
                         torch.bfloat16, True, False, cnt())
    dy = torch.randn(N, H, device=DEV).to(torch.bfloat16)
    (dq, ds), _ = TQ.quantize(dy, gdt, False, cnt())
    (gq, gs), (gqt, gst), part = TG.dswiglu(dq, ds, m["w2q"][2], m["w2q"][3], ab, m["wt"], m["pair"], m["eoff"],
                                            K_TOP, gdt, False, cnt())
    rp, re = m["rp"], m["re"]
    DY = R.dequantize_rows(dq, ds)[rp // K_TOP]
    W2 = R.dequantize_weight(m["w2q"][0], m["w2q"][1])
    g = per_expert(re, lambda e, r0, r1, o: o.__setitem__(slice(r0, r1), DY[r0:r1] @ W2[e]),
                   torch.empty(N * K_TOP, INTER, device=DEV))
    h32 = R.swiglu32(ab)
    assert rel(part.sum(0)[rp], (g * h32).sum(1)) < TIGHT
    gg, uu = ab[:, :INTER].float(), ab[:, INTER:].float()
    sg = torch.sigmoid(gg)
    dh = g * m["wt"].reshape(-1)[rp][:, None]
    dab = torch.cat([dh * uu * sg * (1 + gg * (1 - sg)), dh * gg * sg], 1)
    assert (R.dequantize_rows(gq, gs) - dab).abs().max() <= 2 ** -3 * dab.abs().max()   # e5m2 bound
    # weight gradients from the kernels' own FP8 cols: tight against the fp32 GEMM of their dequantised values
    xt, xts = TQ.quantize_sorted_cols(m["x"], m["pair"], m["eoff"], K_TOP, R.E4M3, False, cnt(), gather=True)
    dw13 = TG.wgrad(gqt, gst, xt, xts, m["eoff"], torch.empty(E, 2 * INTER, H, device=DEV))
    A = R.dequantize_sorted_cols(gqt, gst, re)
    B = R.dequantize_sorted_cols(xt, xts, re)
    ref = torch.stack([A[int(re[e]):int(re[e + 1])].t() @ B[int(re[e]):int(re[e + 1])] for e in range(E)])
    assert rel(dw13, ref) < TIGHT
    exact = torch.stack([dab[int(re[e]):int(re[e + 1])].t() @ m["x"].float()[rp // K_TOP][int(re[e]):int(re[e + 1])]
                         for e in range(E)])
    assert rel(dw13, exact) < 0.1          # e5m2 x e4m3 operands


def test_empty_expert_gets_zero_weight_gradient(moe):
    m = moe
    idx = m["idx"].clone()
    idx[idx == 3] = 2                      # expert 3 unused (duplicates within a row are allowed by the plan)
    pair, eoff = make_plan(idx, E)
    at, ats = TQ.quantize_sorted_cols(m["x"], pair, eoff, K_TOP, R.E4M3, False, cnt(), gather=True)
    out = torch.full((E, H, H), float("nan"), device=DEV)
    TG.wgrad(at, ats, at, ats, eoff, out)
    assert torch.equal(out[3], torch.zeros(H, H, device=DEV)) and torch.isfinite(out).all()


def test_deterministic_and_batch_invariant(moe):
    m = moe

    def down(n):
        idx = m["idx"][:n]
        pair, eoff = make_plan(idx, E)
        (xq, xs), _ = TQ.quantize(m["x"][:n], R.E4M3, False, cnt())
        _, (hq, hs), _ = TG.gateup(xq, xs, m["w13q"][0], m["w13q"][1], pair, eoff, K_TOP, torch.bfloat16, False,
                                   False, cnt())
        o = torch.empty(n * K_TOP, H, dtype=torch.bfloat16, device=DEV)
        return TG.rows_gemm(hq, hs, m["w2q"][0], m["w2q"][1], pair, eoff, K_TOP, o, a_gather=False)

    full = down(N)
    assert torch.equal(full, down(N))
    assert torch.equal(full[:5 * K_TOP], down(5))   # a token's rows do not depend on the rest of the batch


def test_row_results_do_not_depend_on_the_tile_tier():
    """gateup (without SAVE) and rows_gemm take 64-row tiles below LARGE_ROWS_PER_EXPERT rows per expert and
    128-row tiles from there (TG.SMALL_CFG / TG.CFG): a token's gate/up-then-down rows, and its dx rows from e5m2
    gradients, are bitwise the same in a call of each tier."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    n = 2 * TG.LARGE_ROWS_PER_EXPERT * E // K_TOP + 8          # enough rows per expert for the large tier
    x = torch.randn(n, H, generator=g).to(torch.bfloat16).to(DEV)
    w13 = wq((torch.randn(E, 2 * INTER, H, generator=g) * H ** -0.5).to(DEV))
    w2 = wq((torch.randn(E, H, INTER, generator=g) * INTER ** -0.5).to(DEV))
    idx = torch.stack([torch.randperm(E, generator=g)[:K_TOP] for _ in range(n)]).to(DEV)

    def forward(m):
        pair, eoff = make_plan(idx[:m], E)
        (xq, xs), _ = TQ.quantize(x[:m], R.E4M3, False, cnt())
        _, (hq, hs), _ = TG.gateup(xq, xs, w13[0], w13[1], pair, eoff, K_TOP, torch.bfloat16, False, False, cnt())
        o = torch.empty(m * K_TOP, H, dtype=torch.bfloat16, device=DEV)
        return TG.rows_gemm(hq, hs, w2[0], w2[1], pair, eoff, K_TOP, o, a_gather=False), hq, pair

    assert TG._cfg(n * K_TOP, E, True) is TG.CFG and TG._cfg(7 * K_TOP, E, True) is TG.SMALL_CFG
    big, big_h, big_pair = forward(n)
    small, small_h, small_pair = forward(7)
    assert torch.equal(big[:7 * K_TOP], small)
    # h rows (the down GEMM's FP8 input) too: sorted rows, so compare per (token, slot) pair
    row_of = {int(p): i for i, p in enumerate(big_pair.tolist())}
    for i, p in enumerate(small_pair.tolist()):
        assert torch.equal(small_h[i].view(torch.uint8), big_h[row_of[p]].view(torch.uint8)), p
    # rows_gemm over e5m2 rows, as backward's dx GEMM takes gradients: one fixed row per (token, slot) pair,
    # quantised per row, so both calls see the same FP8 rows in their own sorted order
    grad = torch.randn(n * K_TOP, INTER, generator=g).to(torch.bfloat16).to(DEV)

    def dx(m):
        pair, eoff = make_plan(idx[:m], E)
        (aq, as_), _ = TQ.quantize(grad[pair.long()], R.E5M2, False, cnt())
        o = torch.empty(m * K_TOP, H, dtype=torch.bfloat16, device=DEV)
        return TG.rows_gemm(aq, as_, w2[0], w2[1], pair, eoff, K_TOP, o, a_gather=False)
    assert torch.equal(dx(n)[:7 * K_TOP], dx(7))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuBLAS blockwise scaled_mm, sm_90)")
def test_torch_scaled_mm_path_matches_triton():
    from ringlinear.ops.fp8 import torch_mm
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("cuBLAS 1x128/128x128 scaling exists on sm_90 only")
    g = torch.Generator().manual_seed(2)
    T, Kd, Nd = 256, 512, 512
    x = torch.randn(T, Kd, generator=g).to(DEV)
    w = (torch.randn(Nd, Kd, generator=g) * 0.05).to(DEV)
    (xq, xs), (xt, xts) = TQ.quantize(x, R.E4M3, False, cnt(), rows=True, cols=True)
    q, s, qt, st = wq(w)
    ref = R.dequantize_rows(xq, xs) @ R.dequantize_weight(q, s).t()
    assert rel(torch_mm.fprop(xq, xs, q, s, torch.float32), ref) < TIGHT
    dy = torch.randn(T, Nd, generator=g).to(DEV)
    (dq, ds), (dyt, dyts) = TQ.quantize(dy, R.E4M3, False, cnt(), rows=True, cols=True)
    assert rel(torch_mm.dgrad(dq, ds, qt, st, torch.float32),
               R.dequantize_rows(dq, ds) @ R.dequantize_weight(q, s)) < TIGHT
    assert rel(torch_mm.wgrad(dyt, dyts, xt, xts, torch.float32),
               R.dequantize_rows(dyt, dyts) @ R.dequantize_rows(xt, xts).t()) < TIGHT


def test_cublas_row_constraint_sends_odd_row_counts_to_triton(monkeypatch):
    """cuBLASLt's 1x128-scaled GEMM refuses row counts that are not a multiple of 4 (measured on an H200: M = 1,
    2, 3, 130 fail, 4 ... 4096 run): `fits` says so, "auto" then takes the Triton GEMM, a forced cuBLAS path
    names the row count in a one-line error before any GPU work."""
    from ringlinear.ops.fp8 import autograd as A, torch_mm
    ws = torch.ones(2, 4)  # a 256 x 512 weight's 128x128 scales: K/128 = 4 fits
    assert torch_mm.fits("fprop", ws, 128) and not torch_mm.fits("fprop", ws, 130)
    assert not torch_mm.fits("fprop", torch.ones(2, 3), 128)
    monkeypatch.setattr(torch_mm, "available", lambda device=None: True)  # as on a Hopper GPU
    assert A._gemm_backend("fprop", torch.device(DEV), torch_mm.fits("fprop", ws, 128)) == "torch"
    assert A._gemm_backend("fprop", torch.device(DEV), torch_mm.fits("fprop", ws, 130)) == "triton"
    xq = torch.zeros(130, 512, dtype=R.E4M3)
    with pytest.raises(ValueError, match="M=130 rows must be a multiple of 4"):
        torch_mm.fprop(xq, torch.ones(4, 130), torch.zeros(256, 512, dtype=R.E4M3), ws, torch.float32)
