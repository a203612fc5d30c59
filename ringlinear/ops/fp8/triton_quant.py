"""FP8 quantisation kernels: tile scales, the fused producers (RMSNorm -> FP8, the MoE's expert-sorted transposed
copies), the one-pass rows + cols quantiser of a bf16 tensor (dY) and the 128x128 weight quantiser.

Scales and codes follow `reference.py` bit for bit: amax is exact, s = div_rn(amax, fmax) (IEEE, as torch divides)
at least FLT_MIN, optional power-of-two rounding by exponent bits, codes = rne(x * div_rn(1, s)) by the satfinite
cast. Every
quantiser adds the number of non-finite inputs it met to a device counter (`counter`); nothing is clamped
silently. The `@triton.jit` helpers here are shared with the GEMM epilogues in `triton_gemm.py`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..moe.triton_gemm import _row_tile  # the fused MoE's tile finder: the same row tiles as its GEMMs
from .reference import FP8_MAX, TILE, row_tile_bound
from .._triton import cdiv, next_pow2, patch_interpreter

patch_interpreter()

TL_FP8 = {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}
FLT_MIN = tl.constexpr(1.1754943508222875e-38)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _tile(tile, name):
    """A (size, warps) launch tile, checked: size a power of two in 16..128, warps 1, 2, 4 or 8."""
    size, warps = tile
    if size not in (16, 32, 64, 128) or warps not in (1, 2, 4, 8):
        raise ValueError(f"{name}: (size, warps) with size 16/32/64/128 and warps 1/2/4/8, got {tile}")
    return size, warps


def _pad(T):
    """Columns of a cols (transposed) copy of T rows: whole 128-row tiles."""
    return cdiv(T, TILE) * TILE


@triton.jit
def tile_scale(amax, FMAX: tl.constexpr, POW2: tl.constexpr):
    """fp32 scales from fp32 amax (any shape): max(amax / FMAX, FLT_MIN), optionally rounded up to 2^e."""
    s = tl.maximum(tl.math.div_rn(amax, tl.zeros_like(amax) + FMAX), FLT_MIN)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        e = (bits & 0x7F800000) + tl.where((bits & 0x7FFFFF) != 0, 0x800000, 0)
        s = e.to(tl.float32, bitcast=True)
    return s


@triton.jit
def encode(x, s, QDT: tl.constexpr):
    """rne(x * (1 / s)) as fp8 codes; x and s broadcastable fp32, s the (small) vector of tile scales. The
    reciprocal is IEEE-rounded (as torch's 1 / s) and computed once per tile, so the per-element work is one
    multiply and one satfinite cast."""
    r = tl.math.div_rn(tl.zeros_like(s) + 1.0, s)
    return (x * r).to(QDT)


@triton.jit
def count_nonfinite(x, cnt_ptr):
    """Adds the number of NaN/inf elements of x to the int64 counter (integer atomics: exact and order-free)."""
    bad = tl.sum(tl.sum(tl.where(tl.abs(x) <= FLT_MAX, 0, 1), 1), 0)
    tl.atomic_add(cnt_ptr, bad.to(tl.int64), mask=bad > 0, sem="relaxed")


@triton.jit
def store_rows(v, rows, rmask, cols, cmask, q_ptr, ldq, s_ptr, QDT: tl.constexpr, FMAX: tl.constexpr,
               POW2: tl.constexpr):
    """v [BM, 128] fp32, one 1x128 tile per row: codes to q[r, c] (q_ptr + r*ldq + c), scales to s_ptr + r
    (s_ptr points at this column block's row of the [blocks, rows] scale layout)."""
    m = rmask[:, None] & cmask[None, :]
    v = tl.where(m, v, 0.0)
    s = tile_scale(tl.max(tl.abs(v), 1), FMAX, POW2)
    r64 = rows.to(tl.int64)
    tl.store(q_ptr + r64[:, None] * ldq + cols[None, :], encode(v, s[:, None], QDT), mask=m)
    tl.store(s_ptr + r64, s, mask=rmask)


@triton.jit
def store_cols(v, rows, rmask, cols, cmask, qt_ptr, ldqt, st_ptr, QDT: tl.constexpr, FMAX: tl.constexpr,
               POW2: tl.constexpr):
    """v [128, BN] fp32 over 128 consecutive rows: one tile per column, codes transposed to qt[c, r]
    (qt_ptr + c*ldqt + r), scales to st_ptr + c (the row of this row tile). Rows outside rmask are written as
    zero codes: the padding of a partial tile is zero, so the weight-gradient GEMM reads whole tiles unmasked."""
    v = tl.where(rmask[:, None] & cmask[None, :], v, 0.0)
    s = tile_scale(tl.max(tl.abs(v), 0), FMAX, POW2)
    tl.store(qt_ptr + cols[None, :].to(tl.int64) * ldqt + rows[:, None], encode(v, s[None, :], QDT),
             mask=cmask[None, :])
    tl.store(st_ptr + cols, s, mask=cmask)


# ---- one-pass rows + cols quantiser of a [T, C] tensor (dY and any activation without a fused producer) ------------

@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, cnt_ptr, T, C, stride_x, ldqt, ROWS: tl.constexpr,
                  COLS: tl.constexpr, QDT: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr):
    tb = tl.program_id(0)
    cb = tl.program_id(1)
    rows = tb * 128 + tl.arange(0, 128)
    cols = cb * 128 + tl.arange(0, 128)
    rmask = rows < T
    cmask = cols < C
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    count_nonfinite(x, cnt_ptr)
    if ROWS:
        store_rows(x, rows, rmask, cols, cmask, q_ptr, C, s_ptr + cb * T, QDT, FMAX, POW2)
    if COLS:
        store_cols(x, rows, rmask, cols, cmask, qt_ptr, ldqt, st_ptr + tb * C, QDT, FMAX, POW2)


def quantize(x, dtype, pow2, counter, rows=True, cols=False):
    """x [T, C] -> ((q [T, C], s [ceil(C/128), T]) or None, (qT [C, Tp], sT [Tp/128, C]) or None), where
    Tp = T rounded up to 128 (zero codes in the padding)."""
    T, C = x.shape
    assert x.stride(1) == 1
    dev = x.device
    q = torch.empty(T, C, dtype=dtype, device=dev) if rows else None
    s = torch.empty(cdiv(C, TILE), T, dtype=torch.float32, device=dev) if rows else None
    qt = torch.empty(C, _pad(T), dtype=dtype, device=dev) if cols else None
    st = torch.empty(cdiv(T, TILE), C, dtype=torch.float32, device=dev) if cols else None
    if T and (rows or cols):
        dummy = q if rows else qt
        _quant_kernel[(cdiv(T, TILE), cdiv(C, TILE))](
            x, q if rows else dummy, s if rows else st, qt if cols else dummy, st if cols else s, counter, T, C,
            x.stride(0), _pad(T), ROWS=rows, COLS=cols, QDT=TL_FP8[dtype], FMAX=FP8_MAX[dtype], POW2=pow2, num_warps=8)
    return ((q, s) if rows else None), ((qt, st) if cols else None)


# ---- 128x128 weight blocks, both orientations ---------------------------------------------------------------------

@triton.jit
def _weight_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, cnt_ptr, sw_e, sw_n, sq_e, sq_n, ss_e, ss_n, sqt_e,
                   sqt_k, sst_e, sst_k, POW2: tl.constexpr):
    """One 128x128 block in both orientations. The transposed codes come from a second, transposed load of the
    block, each copy stored in its own row-major order: on an H200 (Triton 3.6) storing one fp8 register tile
    through transposed pointers, or through tl.trans, wrote a quarter to a third of qt wrong and left some of it
    unwritten. amax is exact, so both copies share the scale and their codes are the same bits."""
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    n = nb * 128 + tl.arange(0, 128)
    k = kb * 128 + tl.arange(0, 128)
    w = tl.load(w_ptr + e * sw_e + n[:, None] * sw_n + k[None, :]).to(tl.float32)        # [n, k]
    count_nonfinite(w, cnt_ptr)
    s = tile_scale(tl.max(tl.max(tl.abs(w), 1), 0), 448.0, POW2)
    tl.store(q_ptr + e * sq_e + n[:, None] * sq_n + k[None, :], encode(w, s, tl.float8e4nv))
    wt = tl.load(w_ptr + e * sw_e + n[None, :] * sw_n + k[:, None]).to(tl.float32)       # [k, n]
    tl.store(qt_ptr + e * sqt_e + k[:, None] * sqt_k + n[None, :], encode(wt, s, tl.float8e4nv))
    tl.store(s_ptr + e * ss_e + nb * ss_n + kb, s)
    tl.store(st_ptr + e * sst_e + kb * sst_k + nb, s)


def quantize_weight_into(w, q, s, qt, st, pow2, counter):
    """w [E, N, K] (or [N, K]) -> writes q [E, N, K], s [E, N/128, K/128], qt [E, K, N], st [E, K/128, N/128]
    (views with unit inner stride, e.g. halves of a gate|up buffer)."""
    if w.dim() == 2:
        w, q, s, qt, st = (t.unsqueeze(0) for t in (w, q, s, qt, st))
    E, N, K = w.shape
    for t in (w, q, s, qt, st):
        assert t.stride(-1) == 1
    _weight_kernel[(N // TILE, K // TILE, E)](
        w, q, s, qt, st, counter, w.stride(0), w.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        qt.stride(0), qt.stride(1), st.stride(0), st.stride(1), POW2=pow2, num_warps=8)


# ---- RMSNorm -> FP8 rows (and, in a second pass over 128-token blocks, the transposed copy) -----------------------

@triton.jit
def norm_apply(x, rstd, w, XDT: tl.constexpr, YDT: tl.constexpr):
    """The reference's rounding points: weight * (x * rstd).to(x.dtype), in the promoted dtype; fp32 values."""
    n = (x * rstd).to(XDT).to(tl.float32)
    return (w * n).to(YDT).to(tl.float32)


@triton.jit
def _rms_rows_kernel(x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, rstd_ptr, cnt_ptr, T, stride_x, eps, C: tl.constexpr,
                     NKB: tl.constexpr, XDT: tl.constexpr, YDT: tl.constexpr, WRITE_Y: tl.constexpr,
                     QDT: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr, BT: tl.constexpr):
    """BT full rows per program, loaded, summed and stored as [BT, NKB * 128] and viewed as [BT, NKB, 128] only
    for the 1x128 tile maxima. Loaded and reduced as a 3D tile, an H200 (Triton 3.6) counted ~1e12 non-finite
    values per call on finite inputs at NKB = 32 (the interpreter none)."""
    CP: tl.constexpr = NKB * 128
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    col = tl.arange(0, CP)
    kb = tl.arange(0, NKB)
    r64 = rows.to(tl.int64)[:, None]
    m = (rows < T)[:, None] & (col < C)[None, :]
    x = tl.load(x_ptr + r64 * stride_x + col[None, :], mask=m, other=0.0).to(tl.float32)
    count_nonfinite(x, cnt_ptr)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / C + eps)
    w = tl.load(w_ptr + col, mask=col < C, other=0.0).to(tl.float32)[None, :]
    y = tl.where(m, norm_apply(x, rstd[:, None], w, XDT, YDT), 0.0)
    if WRITE_Y:
        tl.store(y_ptr + r64 * C + col[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
    y3 = tl.reshape(y, [BT, NKB, 128])
    s = tile_scale(tl.max(tl.abs(y3), 2), FMAX, POW2)                            # [BT, NKB]
    tl.store(q_ptr + r64 * C + col[None, :], tl.reshape(encode(y3, s[:, :, None], QDT), [BT, CP]), mask=m)
    tl.store(s_ptr + kb[None, :] * T + rows[:, None], s, mask=(rows < T)[:, None] & (kb < C // 128)[None, :])
    tl.store(rstd_ptr + rows, rstd, mask=rows < T)


@triton.jit
def _rms_cols_kernel(x_ptr, w_ptr, rstd_ptr, qt_ptr, st_ptr, T, stride_x, ldqt, C: tl.constexpr, XDT: tl.constexpr,
                     YDT: tl.constexpr, QDT: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr, BN: tl.constexpr):
    """The transposed copy of the same normed values: 128 tokens x BN channels, tiles along tokens."""
    tb = tl.program_id(0)
    cb = tl.program_id(1)
    rows = tb * 128 + tl.arange(0, 128)
    cols = cb * BN + tl.arange(0, BN)
    rmask = rows < T
    cmask = cols < C
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = norm_apply(x, rstd[:, None], w[None, :], XDT, YDT)
    store_cols(y, rows, rmask, cols, cmask, qt_ptr, ldqt, st_ptr + tb * C, QDT, FMAX, POW2)


# (channels, warps) of a program of the cols pass. Any width gives the same bits (a column's tile is its 128 tokens
# whatever the width); benchmarks/fp8.py --tiles times the candidates against linghe, whose pass is 32 wide. H200,
# 8K tokens, rows+cols, fastest of the three in each of three runs at h2048 and h4096: 64 channels / 4 warps (e.g.
# 0.0874 and 0.0769 ms against 0.0959 and 0.0888 with 128 / 8).
RMS_COLS_TILE = (64, 4)
COLS_TILES = ((32, 4), (64, 4), (128, 8))


def rms_norm_quant(x, weight, eps, pow2, counter, write_y=True, cols=False, cols_tile=None):
    """x [T, C], weight [C] -> (y [T, C] or None, (q [T, C], s [ceil(C/128), T]), cols (qT [C, Tp], sT) or None,
    rstd [T]) (cols layout as in `quantize`). cols_tile: (channels, warps) of the cols pass (RMS_COLS_TILE).
    y = weight * (x * rstd).to(x.dtype) in the promoted dtype (reference.rms_norm); FP8 copies are e4m3 of y."""
    T, C = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous() and C <= 16384
    dev = x.device
    ydt = torch.promote_types(x.dtype, weight.dtype)
    for d in (x.dtype, ydt):
        if d not in _TL:
            raise ValueError(f"fp8 rms_norm takes fp32/bf16/fp16 tensors, got {d}")
    y = torch.empty(T, C, dtype=ydt, device=dev) if write_y else None
    q = torch.empty(T, C, dtype=torch.float8_e4m3fn, device=dev)
    s = torch.empty(cdiv(C, TILE), T, dtype=torch.float32, device=dev)
    rstd = torch.empty(T, dtype=torch.float32, device=dev)
    nkb = next_pow2(cdiv(C, TILE))
    bt = max(1, min(16, 8192 // (nkb * TILE)))
    common = dict(XDT=_TL[x.dtype], YDT=_TL[ydt], QDT=tl.float8e4nv, FMAX=448.0, POW2=pow2)
    qc = None
    if T:
        _rms_rows_kernel[(cdiv(T, bt),)](x, weight, y if write_y else q, q, s, rstd, counter, T, x.stride(0),
                                         float(eps), C=C, NKB=nkb, WRITE_Y=write_y, BT=bt,
                                         num_warps=8 if nkb * TILE * bt >= 8192 else 4, **common)
    if cols:
        qt = torch.empty(C, _pad(T), dtype=torch.float8_e4m3fn, device=dev)
        st = torch.empty(cdiv(T, TILE), C, dtype=torch.float32, device=dev)
        bn, warps = _tile(cols_tile or RMS_COLS_TILE, "cols_tile")
        if T:
            _rms_cols_kernel[(cdiv(T, TILE), cdiv(C, bn))](x, weight, rstd, qt, st, T, x.stride(0), _pad(T), C=C,
                                                           BN=bn, num_warps=warps, **common)
        qc = (qt, st)
    return y, (q, s), qc, rstd


# ---- SwiGLU -> FP8 of a gate|up tensor produced elsewhere (the fused GEMM epilogue is the hot path) --------------

@triton.jit
def _swiglu_kernel(ab_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, cnt_ptr, T, ldqt, I: tl.constexpr, COLS: tl.constexpr,
                   POW2: tl.constexpr, BM: tl.constexpr):
    """BM tokens x 128 channels (BM = 128 with COLS: a cols tile is 128 tokens)."""
    tb = tl.program_id(0)
    cb = tl.program_id(1)
    rows = tb * BM + tl.arange(0, BM)
    cols = cb * 128 + tl.arange(0, 128)
    rmask = rows < T
    ptr = ab_ptr + rows[:, None].to(tl.int64) * (2 * I) + cols[None, :]
    g = tl.load(ptr, mask=rmask[:, None], other=0.0).to(tl.float32)
    u = tl.load(ptr + I, mask=rmask[:, None], other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    count_nonfinite(h, cnt_ptr)
    store_rows(h, rows, rmask, cols, cols < I, q_ptr, I, s_ptr + cb * T, tl.float8e4nv, 448.0, POW2)
    if COLS:
        store_cols(h, rows, rmask, cols, cols < I, qt_ptr, ldqt, st_ptr + tb * I, tl.float8e4nv, 448.0, POW2)


# (tokens, warps) of a program of the rows-only SwiGLU quantiser; rows + cols always take 128 tokens, 8 warps. Any
# height gives the same bits (each row's tiles are its own); benchmarks/fp8.py --tiles times the candidates. H200,
# 8K tokens, two runs: 64 tokens / 8 warps 0.0528 and 0.0518 ms at I4096 (128 / 8: 0.0609, 0.0604); at I2048 the
# two runs disagree (0.0307 vs 0.0347, then 0.0373 vs 0.0347).
SWIGLU_ROWS_TILE = (64, 8)
ROWS_TILES = ((32, 4), (64, 4), (64, 8), (128, 8))


def swiglu_quant(ab, pow2, counter, cols=False, rows_tile=None):
    """ab [T, 2I] (gate | up) -> FP8 of h = silu(gate) * up (fp32): rows (q [T, I], s [I/128, T]) and optionally
    cols (qT [I, Tp], sT [Tp/128, I], as in `quantize`); the values `reference.swiglu32` defines. rows_tile:
    (tokens, warps) when cols is off (SWIGLU_ROWS_TILE)."""
    T, I2 = ab.shape
    inter = I2 // 2
    assert ab.is_contiguous() and inter % TILE == 0
    dev = ab.device
    q = torch.empty(T, inter, dtype=torch.float8_e4m3fn, device=dev)
    s = torch.empty(inter // TILE, T, dtype=torch.float32, device=dev)
    qt = torch.empty(inter, _pad(T) if cols else 1, dtype=torch.float8_e4m3fn, device=dev)
    st = torch.empty(cdiv(T, TILE) if cols else 1, inter, dtype=torch.float32, device=dev)
    bm, warps = (TILE, 8) if cols else _tile(rows_tile or SWIGLU_ROWS_TILE, "rows_tile")
    if T:
        _swiglu_kernel[(cdiv(T, bm), inter // TILE)](ab, q, s, qt, st, counter, T, qt.stride(0), I=inter,
                                                     COLS=cols, POW2=pow2, BM=bm, num_warps=warps)
    return (q, s), ((qt, st) if cols else None)


# ---- expert-sorted transposed copies for the MoE weight gradients -------------------------------------------------

@triton.jit
def _sorted_cols_kernel(src_ptr, pair_ptr, eoff_ptr, wt_ptr, qt_ptr, st_ptr, cnt_ptr, ldqt, stride_src,
                        C: tl.constexpr, TOPK: tl.constexpr, E: tl.constexpr, GATHER: tl.constexpr,
                        WEIGHTED: tl.constexpr, QDT: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr):
    """Row tile t of the expert-sorted rows x column block: src rows (gathered by token when GATHER, times the
    pair's routing weight when WEIGHTED) quantised along the rows, written transposed into tile slot t of
    qt [C, slots*128]."""
    e, rows, rmask, cols, _pn = _row_tile(eoff_ptr, C, E, 128, 128)
    if e >= E:
        return
    t = tl.program_id(0) // (C // 128)
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
    src_row = (pair // TOPK) if GATHER else rows
    x = tl.load(src_ptr + src_row[:, None].to(tl.int64) * stride_src + cols[None, :], mask=rmask[:, None],
                other=0.0).to(tl.float32)
    if WEIGHTED:
        x = x * tl.load(wt_ptr + pair, mask=rmask, other=0.0)[:, None]
    count_nonfinite(x, cnt_ptr)
    store_cols(x, tl.arange(0, 128), rmask, cols, cols < C, qt_ptr + t * 128, ldqt, st_ptr + t * C, QDT, FMAX, POW2)


def quantize_sorted_cols(src, pair, eoff, top_k, dtype, pow2, counter, gather, wt=None):
    """src [N, C] (token rows, gather) or [N*k, C] (sorted rows) -> (qT [C, slots*128], sT [slots, C])."""
    C = src.shape[1]
    nk = pair.numel()
    E = eoff.numel() - 1
    assert src.stride(1) == 1 and C % TILE == 0
    slots = row_tile_bound(nk, E)
    qt = torch.empty(C, slots * TILE, dtype=dtype, device=src.device)
    st = torch.empty(slots, C, dtype=torch.float32, device=src.device)
    if nk:
        _sorted_cols_kernel[(slots * (C // TILE),)](
            src, pair, eoff, wt if wt is not None else st, qt, st, counter, qt.stride(0), src.stride(0), C=C,
            TOPK=top_k, E=E, GATHER=gather, WEIGHTED=wt is not None, QDT=TL_FP8[dtype], FMAX=FP8_MAX[dtype],
            POW2=pow2, num_warps=8)
    return qt, st
