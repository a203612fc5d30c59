"""FP8 quantisation: the reference's round trips within e4m3/e5m2 bounds, power-of-two exactness, zero tiles, and
every quantising kernel bitwise against the reference (CPU: Triton interpreter; CUDA: compiled kernels). Both
sides divide with IEEE rounding and cast with round-to-nearest-even, so codes and scales must be equal (`==`).
"""
import pytest
import torch

pytest.importorskip("triton")

from ringlinear.ops.fp8 import reference as R  # noqa: E402
from ringlinear.ops.fp8 import triton_quant as TQ  # noqa: E402
from ringlinear.ops.moe.triton_route import make_plan  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# smallest normal code of each format (codes are x / scale)
MIN_NORMAL = {R.E4M3: 2.0 ** -6, R.E5M2: 2.0 ** -14}
REL_BOUND = {R.E4M3: 2.0 ** -4, R.E5M2: 2.0 ** -3}   # half an ulp of a 3- / 2-bit mantissa


def heavy(shape, seed, dtype=torch.bfloat16):
    """Gradient-like data: rows of very different magnitude, heavy tails, some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(shape[0], 1, generator=g))
    x = x * (1 + 20 * (torch.rand(*shape, generator=g) < 0.01))
    x[0, :128] = 0.0
    return x.to(dtype).to(DEV)


def u8(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", [R.E4M3, R.E5M2])
@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_within_format_bounds(dtype, pow2):
    x = heavy((70, 384), seed=1, dtype=torch.float32)
    q, s = R.quantize_rows(x, dtype, pow2)
    assert q.dtype == dtype and s.shape == (3, 70) and s.dtype == torch.float32
    assert torch.isfinite(q.float()).all() and (q.float().abs() <= R.FP8_MAX[dtype]).all()
    xd = R.dequantize_rows(q, s)
    sc = s.t().repeat_interleave(128, 1)
    normal = x.abs() >= MIN_NORMAL[dtype] * sc * (1 + 1e-6)
    err = (xd - x).abs()
    assert (err[normal] <= REL_BOUND[dtype] * x.abs()[normal]).all()
    # below the normal range the spacing is the smallest subnormal: half of it times the scale
    sub_half = {R.E4M3: 2.0 ** -10, R.E5M2: 2.0 ** -17}[dtype]
    assert (err[~normal] <= sub_half * sc[~normal] * (1 + 1e-6)).all()
    if not pow2:  # each tile's largest element maps to the format's max (the full range is used)
        amax_code = q.float().abs().view(70, 3, 128).amax(-1)
        assert (amax_code[s.t() > R.FLT_MIN] == R.FP8_MAX[dtype]).all()


def test_zero_tile_gets_a_safe_scale():
    x = torch.zeros(4, 256)
    x[1, 200] = 3.0
    q, s = R.quantize_rows(x)
    assert s[0, 0] == R.FLT_MIN and torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(R.dequantize_rows(q, s), x)


def test_pow2_scales_are_powers_of_two_and_rescale_exactly():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 126, (16, 256), generator=g).to(torch.uint8).view(R.E4M3).float()  # finite codes
    codes[:, ::128] = 448.0                                              # tile max on the grid's largest value
    exps = torch.randint(-20, 20, (16, 2), generator=g).float()
    x = codes * torch.exp2(exps).repeat_interleave(128, 1)               # exactly representable by the recipe
    q, s = R.quantize_rows(x, pow2=True)
    m, e = torch.frexp(s)
    assert (m == 0.5).all()
    assert torch.equal(R.dequantize_rows(q, s), x)                       # exact, not just within bounds
    q2, s2 = R.quantize_rows(x * 1.1, pow2=True)                         # off-grid values: still within bounds
    assert (R.dequantize_rows(q2, s2) - x * 1.1).abs().max() <= 2 ** -4 * (x * 1.1).abs().max()


def test_weight_blocks_and_transpose():
    w = torch.randn(256, 384) * 0.02
    q, s, qt, st = R.quantize_weight(w)
    assert s.shape == (2, 3) and st.shape == (3, 2)
    assert torch.equal(u8(qt), u8(q.t().contiguous())) and torch.equal(st, s.t())
    assert ((R.dequantize_weight(q, s) - w).abs() <= 2 ** -4 * w.abs() + 2 ** -10 * s.max()).all()


@pytest.mark.parametrize("dtype", [R.E4M3, R.E5M2])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(200, 256), (64, 384)])
def test_quantize_kernel_rows_and_cols_bitwise(dtype, pow2, shape):
    x = heavy(shape, seed=sum(shape))
    cnt = torch.zeros(1, dtype=torch.int64, device=DEV)
    (q, s), (qt, st) = TQ.quantize(x, dtype, pow2, cnt, rows=True, cols=True)
    rq, rs = R.quantize_rows(x, dtype, pow2)
    cq, cs = R.quantize_cols(x, dtype, pow2)
    assert torch.equal(u8(q), u8(rq)) and torch.equal(s, rs)
    assert torch.equal(u8(qt), u8(cq)) and torch.equal(st, cs)
    assert int(cnt) == 0


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter divides inf by inf
def test_nonfinite_inputs_are_counted():
    x = torch.randn(130, 256, device=DEV)
    x[0, 0], x[129, 255], x[64, 3] = float("nan"), float("inf"), -float("inf")
    cnt = torch.zeros(1, dtype=torch.int64, device=DEV)
    TQ.quantize(x, R.E4M3, False, cnt, rows=True, cols=True)
    assert int(cnt) == 3
    TQ.quantize(x.to(torch.bfloat16), R.E5M2, True, cnt, rows=True)
    assert int(cnt) == 6


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_kernel_bitwise(pow2):
    w = (torch.randn(3, 256, 384) * 0.02).to(DEV)
    out = (torch.empty(3, 256, 384, dtype=R.E4M3, device=DEV), torch.empty(3, 2, 3, device=DEV),
           torch.empty(3, 384, 256, dtype=R.E4M3, device=DEV), torch.empty(3, 3, 2, device=DEV))
    TQ.quantize_weight_into(w, *out, pow2, torch.zeros(1, dtype=torch.int64, device=DEV))
    for a, b in zip(out, R.quantize_weight(w, pow2)):
        assert torch.equal(u8(a) if a.dtype == R.E4M3 else a, u8(b) if b.dtype == R.E4M3 else b)


@pytest.mark.parametrize("xdt,wdt", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                     (torch.bfloat16, torch.float32)])
def test_rms_norm_quant_kernel(xdt, wdt):
    from ringlinear.ops.norm.reference import rms_norm
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(150, 256, generator=g) * 3).to(xdt).to(DEV)
    w = (1 + 0.1 * torch.randn(256, generator=g)).to(wdt).to(DEV)
    cnt = torch.zeros(1, dtype=torch.int64, device=DEV)
    y, (q, s), (qt, st), _ = TQ.rms_norm_quant(x, w, 1e-6, False, cnt, write_y=True, cols=True)
    yr = rms_norm(x, w, 1e-6)
    assert y.dtype == yr.dtype
    # rsqrt is approximate on the GPU: the normed values agree to the output dtype's rounding
    tol = 1e-2 if yr.dtype == torch.bfloat16 else 2e-6
    torch.testing.assert_close(y.float(), yr.float(), rtol=tol, atol=tol)
    rq, rs = R.quantize_rows(y)
    cq, cs = R.quantize_cols(y)          # the cols pass recomputes the norm: it must see the same values
    assert torch.equal(u8(q), u8(rq)) and torch.equal(s, rs)
    assert torch.equal(u8(qt), u8(cq)) and torch.equal(st, cs)
    y2, (q2, _), _, _ = TQ.rms_norm_quant(x, w, 1e-6, False, cnt, write_y=False)
    assert y2 is None and torch.equal(u8(q2), u8(q))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("C", [2048, 4096])
def test_rms_norm_quant_counts_exactly_the_nonfinite_inputs(C):
    """At the models' widths (16 and 32 tiles a row): the norm's rows pass once counted ~1e12 non-finite values per
    call on finite inputs on an H200 at C = 4096 (a 3D-tile reduction; the interpreter counted none)."""
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(130, C, generator=g) * 3).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(torch.bfloat16).to(DEV)
    cnt = torch.zeros(1, dtype=torch.int64, device=DEV)
    TQ.rms_norm_quant(x.to(DEV), w, 1e-6, False, cnt, cols=True)
    assert int(cnt) == 0
    x[3, 5], x[77, C - 1], x[129, 1000] = float("nan"), float("inf"), float("-inf")
    TQ.rms_norm_quant(x.to(DEV), w, 1e-6, False, cnt, write_y=False)
    assert int(cnt) == 3


def test_launch_tiles_give_the_same_bits():
    """The cols pass of the norm and the rows-only SwiGLU quantiser take other launch tiles (benchmarks/fp8.py
    --tiles picks them): each tile of codes and scales is computed from the same elements whatever the tile, so
    the outputs are bitwise those of the default tile, partial row and column blocks included."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(200, 384, generator=g) * 3).to(torch.bfloat16).to(DEV)
    w = (1 + 0.1 * torch.randn(384, generator=g)).to(torch.bfloat16).to(DEV)
    cnt = torch.zeros(1, dtype=torch.int64, device=DEV)
    ref = TQ.rms_norm_quant(x, w, 1e-6, False, cnt, cols=True)[2]
    for tile in TQ.COLS_TILES:
        qt, st = TQ.rms_norm_quant(x, w, 1e-6, False, cnt, cols=True, cols_tile=tile)[2]
        assert torch.equal(u8(qt), u8(ref[0])) and torch.equal(st, ref[1]), tile
    ab = (torch.randn(200, 512, generator=g) * 2).to(torch.bfloat16).to(DEV)
    (rq, rs), _ = TQ.swiglu_quant(ab, True, cnt)
    for tile in TQ.ROWS_TILES:
        (q, s), _ = TQ.swiglu_quant(ab, True, cnt, rows_tile=tile)
        assert torch.equal(u8(q), u8(rq)) and torch.equal(s, rs), tile
    with pytest.raises(ValueError, match="rows_tile: .*got \\(48, 4\\)"):
        TQ.swiglu_quant(ab, True, cnt, rows_tile=(48, 4))


@pytest.mark.parametrize("gather,weighted", [(True, False), (True, True), (False, False)])
def test_sorted_cols_kernel_bitwise(gather, weighted):
    N, k, E, C = 300, 4, 8, 256          # ~150 rows per expert: full and partial tiles
    g = torch.Generator().manual_seed(7)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).to(DEV)
    pair, eoff = make_plan(idx, E)
    rp, re = R.plan(idx, E)
    src = heavy((N if gather else N * k, C), seed=8)
    wt = torch.rand(N, k, generator=g).to(DEV) if weighted else None
    qt, st = TQ.quantize_sorted_cols(src, pair, eoff, k, R.E5M2, False, torch.zeros(1, dtype=torch.int64,
                                                                                     device=DEV), gather, wt)
    rows = src.float()[rp // k] if gather else src.float()
    if weighted:
        rows = rows * wt.reshape(-1)[rp][:, None]
    rq, rs = R.quantize_sorted_cols(rows, re, R.E5M2)
    tiles = R.sorted_tiles(re)
    assert len(tiles) > E  # several experts span more than one tile
    for _e, r0, r1, t in tiles:
        cols = slice(t * 128, t * 128 + r1 - r0)
        assert torch.equal(u8(qt[:, cols]), u8(rq[:, cols])) and torch.equal(st[t], rs[t])


def test_swiglu_quant_kernel():
    g = torch.Generator().manual_seed(9)
    ab = (torch.randn(150, 512, generator=g) * 2).to(torch.bfloat16).to(DEV)
    (q, s), (qt, st) = TQ.swiglu_quant(ab, False, torch.zeros(1, dtype=torch.int64, device=DEV), cols=True)
    h = R.swiglu32(ab)
    rq, rs = R.quantize_rows(h)
    # the kernel's sigmoid may differ from torch's in the last ulp: codes equal almost everywhere, values within
    # the e4m3 bound everywhere
    assert (u8(q) == u8(rq)).float().mean() > 0.99 and (u8(qt) == u8(R.quantize_cols(h)[0])).float().mean() > 0.99
    assert (R.dequantize_rows(q, s) - h).abs().max() <= 2 ** -4 * h.abs().max()
    assert qt.shape == (256, 256) and (qt[:, 150:].view(torch.uint8) == 0).all()   # whole tiles, zero padding
    assert (R.dequantize_rows(qt, st)[:, :150] - h.t()).abs().max() <= 2 ** -4 * h.abs().max()
