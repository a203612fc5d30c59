"""Triton kernels for lightning attention (constant per-head decay). Launch logic lives in `triton.py`.

Shapes: tokens are packed, q/k [Ttot, H, K] and v/o [Ttot, H, V] with a per-tensor token stride (so views of a
fused qkv projection need no copy) and contiguous heads; states [*, H, K, V] fp32, row-major.

Work unit is a *segment*: a run of up to L tokens of one sequence. Without splitting, a segment is the whole
sequence and one program per (segment, head, value block) carries the state on chip from the first chunk to the
last: q, k, v are read once and o written once, no chunk states touch memory. Long sequences are split so that
enough programs exist to fill the GPU; then a local-state pass and a scan over segments (fp32, tiny) give every
segment its initial state first.

Decay: lam = exp(g), g <= 0. Inside a chunk of c tokens (0-based i, j):
    o_i   = scale * (sum_{j<=i} lam^(i-j) (q_i.k_j) v_j + lam^(i+1) q_i S)
    S_new = lam^c S + sum_j lam^(c-1-j) k_j^T v_j
Backward keeps G = dL/dS at the chunk end (reverse sweep) and the forward state S (recomputed, forward sweep).

Precision: q.k^T and the masked-score products run in the input dtype with fp32 accumulation. The forward state
update splits lam^(c-1-j) v into two bf16 parts (see `_state_update`): one rounding would cost ~1.7e-3 relative
error in the final state, above the 1e-3 budget. q.S rounds S to bf16 (output error ~2.4e-3 < 5e-3; bf16, not
fp16, because S can leave fp16's range). The backward (1e-2 budget) runs every product in 16 bits, carried states
as bf16. fp32 inputs use fp32-accurate dots (PREC = "tf32x3" or "ieee") throughout, on smaller chunks.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _segment(i_s, cu, seg_seq, seg_ptr, T, L, VARLEN: tl.constexpr, SPLIT: tl.constexpr):
    """(sequence index, sequence start, segment start, segment end) of segment `i_s`; padding segments of the
    split table (seq id -1) come back empty (start == end) so their loops run zero times."""
    if SPLIT:
        n = tl.load(seg_seq + i_s).to(tl.int64)
        valid = n >= 0
        n = tl.maximum(n, 0)
        bos = tl.load(cu + n).to(tl.int64)
        eos = tl.load(cu + n + 1).to(tl.int64)
        j = i_s - tl.load(seg_ptr + n).to(tl.int64)
        start = bos + j * L
        end = tl.minimum(start + L, eos)
        end = tl.where(valid, end, start)
    else:
        n = i_s.to(tl.int64)
        if VARLEN:
            bos = tl.load(cu + n).to(tl.int64)
            eos = tl.load(cu + n + 1).to(tl.int64)
        else:
            bos = n * T
            eos = bos + T
        start = bos
        end = eos
    return n, start, end


@triton.jit
def _ids(NB: tl.constexpr, H: tl.constexpr):
    """(block, head, segment) of this program; the block index varies fastest so the programs that share a
    (segment, head) run together and re-read their common tiles from L2."""
    pid = tl.program_id(0)
    return pid % NB, (pid // NB) % H, pid // (NB * H)


@triton.jit
def _tile(x, rows, stride, cols, m):
    """x[rows, cols] for token rows (masked to the segment) and contiguous columns."""
    return tl.load(x + rows[:, None] * stride + cols[None, :], mask=m[:, None], other=0.0)


@triton.jit
def _decay_consts(g, i_h, BT: tl.constexpr):
    """log2-decay of head i_h, per-row state decay lam^(i+1) [BT] and the causal decay mask lam^(i-j) [BT, BT]."""
    gl = tl.load(g + i_h).to(tl.float32) * 1.4426950408889634
    rt = tl.arange(0, BT)
    d_row = tl.exp2(gl * (rt + 1).to(tl.float32))
    dm = (rt[:, None] - rt[None, :]).to(tl.float32)
    # where() (not a multiply) masks j > i, where exp2 of a positive exponent may be inf.
    mask = tl.where(dm >= 0, tl.exp2(gl * dm), 0.0)
    return gl, rt, d_row, mask


@triton.jit
def _load_state(seg_buf, seq_buf, i_s, idx, off, SPLIT: tl.constexpr, HAS: tl.constexpr, R: tl.constexpr,
                C: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """A carried [R, C] state tile at offset `off` of one [H, K, V] state: from the per-segment buffer when
    split, else from seq_buf[idx] (initial state / final-state gradient) when given, else zeros."""
    if SPLIT:
        X = tl.load(seg_buf + i_s.to(tl.int64) * (H * K * V) + off)
    elif HAS:
        X = tl.load(seq_buf + idx * (H * K * V) + off)
    else:
        X = tl.zeros([R, C], dtype=tl.float32)
    return X


@triton.jit
def _chunk_weights(gl, rt, t0, end, BT: tl.constexpr):
    """(c, lam^(c-1-j)) for the chunk at t0 of c = min(BT, end - t0) tokens; zero past the end (where the exponent
    would be positive)."""
    c = tl.minimum(end - t0, BT).to(tl.float32)
    rf = rt.to(tl.float32)
    return c, tl.where(rf < c, tl.exp2(gl * (c - 1 - rf)), 0.0)


@triton.jit
def _state_update(S, a, b, w, decay, LOWP: tl.constexpr, PREC: tl.constexpr):
    """S * decay + a^T (w * b), a [BT, K], b [BT, BV] in the input dtype, w [BT] fp32.

    For 16-bit inputs w*b is split into high and low bf16 parts (two tensor-core dots, ~1e-5): one bf16 rounding
    would cost ~1.7e-3 relative error in the state, over the 1e-3 budget. (A single fp16 dot on power-of-two
    scaled operands is as accurate, ~2e-4, but needs the k tile in registers: 23-29% slower on an H200.)"""
    bw = b.to(tl.float32) * w[:, None]
    if not LOWP:
        return tl.dot(tl.trans(a.to(tl.float32)), bw, S * decay, input_precision=PREC)
    hi = bw.to(b.dtype)
    lo = (bw - hi.to(tl.float32)).to(b.dtype)
    S = tl.dot(tl.trans(a), hi, S * decay)
    return tl.dot(tl.trans(a), lo, S)


@triton.jit
def _chunk_out(b_q, b_k, b_v, S, mask, d_row, LOWP: tl.constexpr, PREC: tl.constexpr):
    """Output rows of one chunk before the scale: (Q K^T * mask) V + lam^(i+1) Q S, [BT, BV] fp32. Row i reads only
    q_i, the k/v rows j <= i (the mask is exactly 0 beyond) and S: the aligned decode calls this on a chunk of which
    it has only seen rows 0..i, with the same shapes, and gets row i's bits."""
    A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * mask
    if LOWP:
        b_o = tl.dot(b_q.to(tl.bfloat16), S.to(tl.bfloat16))
    else:
        b_o = tl.dot(b_q.to(tl.float32), S, input_precision=PREC)
    return tl.dot(A.to(b_v.dtype), b_v, b_o * d_row[:, None], input_precision=PREC)


@triton.jit
def _fwd_kernel(q, k, v, o, g, h0, ht, slots, seg_init, cu, seg_seq, seg_ptr, open_k, open_v,
                sq, sk, sv, scale, T, L,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                VARLEN: tl.constexpr, SPLIT: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                USE_SLOTS: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr, ALIGNED: tl.constexpr):
    """One program per (segment, head, value block): o [Ttot, H, V]; final state when not split.

    ALIGNED (serving prefill in numerics="aligned"): a partial last chunk is not folded into the state; its k, v
    rows go to the open-chunk buffers open_k / open_v [slots, BT, H, K|V] instead (see aligned.py)."""
    NV: tl.constexpr = V // BV
    i_v, i_h, i_s = _ids(NV, H)
    n, start, end = _segment(i_s, cu, seg_seq, seg_ptr, T, L, VARLEN, SPLIT)
    gl, rt, d_row, mask = _decay_consts(g, i_h, BT)
    rk = tl.arange(0, K)
    rv = i_v * BV + tl.arange(0, BV)
    st_off = (i_h * K + rk[:, None]).to(tl.int64) * V + rv[None, :]  # [K, BV] inside one [H, K, V] state
    if USE_SLOTS:
        slot = tl.load(slots + n).to(tl.int64)
    else:
        slot = n
    S = _load_state(seg_init, h0, i_s, slot, st_off, SPLIT, HAS_H0, K, BV, H, K, V)
    q += i_h * K
    k += i_h * K
    v += i_h * V
    o += i_h * V
    for t0 in range(start, end, BT):
        rows = t0 + rt
        m = rows < end
        b_q = _tile(q, rows, sq, rk, m)
        b_k = _tile(k, rows, sk, rk, m)
        b_v = _tile(v, rows, sv, rv, m)
        b_o = _chunk_out(b_q, b_k, b_v, S, mask, d_row, LOWP, PREC)
        tl.store(o + rows[:, None] * (H * V) + rv[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m[:, None])
        c, w = _chunk_weights(gl, rt, t0, end, BT)
        S_new = _state_update(S, b_k, b_v, w, tl.exp2(gl * c), LOWP, PREC)
        if ALIGNED:
            # the fold is computed in the same place either way (same code around the dots, so the compiler
            # lowers them alike); an open (partial) chunk keeps the boundary state and its rows for decode
            full = end - t0 >= BT
            S = tl.where(full, S_new, S)
            buf = (slot * BT + rt.to(tl.int64)) * H + i_h
            keep = m & (end - t0 < BT)
            if i_v == 0:
                tl.store(open_k + buf[:, None] * K + rk[None, :], b_k, mask=keep[:, None])
            tl.store(open_v + buf[:, None] * V + rv[None, :], b_v, mask=keep[:, None])
        else:
            S = S_new
    if STORE_HT:
        tl.store(ht + slot * (H * K * V) + st_off, S)


@triton.jit
def _local_state_kernel(a, b, g, out, cu, seg_seq, seg_ptr, sa, sb, scale, T, L,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                        VARLEN: tl.constexpr, REVERSE: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    """Per segment, the state it contributes on its own, out [max_seg, H, K, V]:
    forward  (a=k, b=v):  sum_t lam^(end-1-t) k_t^T v_t            (decayed to the segment end)
    reverse  (a=q, b=dO): scale * sum_t lam^(t-start+1) q_t^T dO_t (decayed to the segment start)."""
    NV: tl.constexpr = V // BV
    i_v, i_h, i_s = _ids(NV, H)
    n, start, end = _segment(i_s, cu, seg_seq, seg_ptr, T, L, VARLEN, True)
    gl, rt, d_row, mask = _decay_consts(g, i_h, BT)
    rk = tl.arange(0, K)
    rv = i_v * BV + tl.arange(0, BV)
    a += i_h * K
    b += i_h * V
    S = tl.zeros([K, BV], dtype=tl.float32)
    nc = tl.cdiv(end - start, BT)
    for ic in range(nc):
        if REVERSE:
            t0 = start + (nc - 1 - ic) * BT
        else:
            t0 = start + ic * BT
        rows = t0 + rt
        m = rows < end
        b_a = _tile(a, rows, sa, rk, m)
        b_b = _tile(b, rows, sb, rv, m)
        c, w = _chunk_weights(gl, rt, t0, end, BT)
        if REVERSE:
            w = d_row * scale
        S = _state_update(S, b_a, b_b, w, tl.exp2(gl * c), LOWP, PREC)
    st_off = (i_h * K + rk[:, None]).to(tl.int64) * V + rv[None, :]
    tl.store(out + i_s.to(tl.int64) * (H * K * V) + st_off, S)


@triton.jit
def _scan_kernel(local, seg_state, g, x0, xN, slots, cu, seg_ptr, L,
                 H: tl.constexpr, KV: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_X0: tl.constexpr, STORE_XN: tl.constexpr, USE_SLOTS: tl.constexpr, REVERSE: tl.constexpr):
    """Sequential combine over the segments of one sequence, elementwise on a BLOCK slice of [K*V].

    forward: seg_state[s] = state entering segment s; x0 = initial state, xN = final state.
    reverse: seg_state[s] = dL/d(state leaving segment s); x0 = dL/d final state, xN = dL/d initial state.
    """
    pid = tl.program_id(0)
    i_h = pid % H
    n = (pid // H).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < KV
    gl = tl.load(g + i_h).to(tl.float32) * 1.4426950408889634
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    s0 = tl.load(seg_ptr + n).to(tl.int64)
    s1 = tl.load(seg_ptr + n + 1).to(tl.int64)
    if USE_SLOTS:
        slot = tl.load(slots + n).to(tl.int64)
    else:
        slot = n
    base = (slot * H + i_h) * KV + offs
    if HAS_X0:
        X = tl.load(x0 + base, mask=msk, other=0.0)
    else:
        X = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(s1 - s0):
        if REVERSE:
            s = s1 - 1 - j
        else:
            s = s0 + j
        seg_len = tl.minimum(L, eos - (bos + (s - s0) * L)).to(tl.float32)
        p = (s * H + i_h) * KV + offs
        tl.store(seg_state + p, X, mask=msk)
        X = X * tl.exp2(gl * seg_len) + tl.load(local + p, mask=msk, other=0.0)
    if STORE_XN:
        tl.store(xN + base, X, mask=msk)


@triton.jit
def _bwd_dq_kernel(k, v, do, dq, g, h0, seg_init, cu, seg_seq, seg_ptr,
                   sk, sv, sdo, scale, T, L,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   VARLEN: tl.constexpr, SPLIT: tl.constexpr, HAS_H0: tl.constexpr, LOWP: tl.constexpr,
                   PREC: tl.constexpr):
    """dq = scale * ((dO V^T * mask) K + lam^(i+1) dO S^T), forward sweep, one program per key block: the rows
    K[kb] of the state depend only on k[:, kb], so the split needs no reduction."""
    NK: tl.constexpr = K // BK
    i_k, i_h, i_s = _ids(NK, H)
    n, start, end = _segment(i_s, cu, seg_seq, seg_ptr, T, L, VARLEN, SPLIT)
    gl, rt, d_row, mask = _decay_consts(g, i_h, BT)
    rk = i_k * BK + tl.arange(0, BK)
    rv = tl.arange(0, V)
    st_off = (i_h * K + rk[:, None]).to(tl.int64) * V + rv[None, :]  # [BK, V]
    S = _load_state(seg_init, h0, i_s, n, st_off, SPLIT, HAS_H0, BK, V, H, K, V)
    k += i_h * K
    v += i_h * V
    do += i_h * V
    dq += i_h * K
    for t0 in range(start, end, BT):
        rows = t0 + rt
        m = rows < end
        b_k = _tile(k, rows, sk, rk, m)
        b_v = _tile(v, rows, sv, rv, m)
        b_do = _tile(do, rows, sdo, rv, m)
        B = tl.dot(b_do, tl.trans(b_v), input_precision=PREC) * mask
        if LOWP:
            b_dq = tl.dot(b_do.to(tl.bfloat16), tl.trans(S).to(tl.bfloat16))
        else:
            b_dq = tl.dot(b_do.to(tl.float32), tl.trans(S), input_precision=PREC)
        b_dq = tl.dot(B.to(b_k.dtype), b_k, b_dq * d_row[:, None], input_precision=PREC)
        tl.store(dq + rows[:, None] * (H * K) + rk[None, :], (b_dq * scale).to(dq.dtype.element_ty),
                 mask=m[:, None])
        c, w = _chunk_weights(gl, rt, t0, end, BT)
        vw = b_v.to(tl.float32) * w[:, None]
        if LOWP:
            S = tl.dot(tl.trans(b_k), vw.to(b_v.dtype), S * tl.exp2(gl * c))
        else:
            S = tl.dot(tl.trans(b_k.to(tl.float32)), vw, S * tl.exp2(gl * c), input_precision=PREC)


@triton.jit
def _bwd_dv_kernel(q, k, do, dv, g, dht, dh0, g_end, cu, seg_seq, seg_ptr,
                   sq, sk, sdo, scale, T, L,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                   VARLEN: tl.constexpr, SPLIT: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                   LOWP: tl.constexpr, PREC: tl.constexpr):
    """Reverse sweep per (segment, head, value block) carrying G[:, vb] = dL/dS [K, BV]:
        dv = scale (A*mask)^T dO + lam^(c-1-j) K G,   G <- lam^c G + scale Q^T (lam^(i+1) dO).
    The value-block split is exact (G[:, vb] depends only on dO[:, vb]); dL/d(initial state) falls out at the
    start of the sequence."""
    NV: tl.constexpr = V // BV
    i_v, i_h, i_s = _ids(NV, H)
    n, start, end = _segment(i_s, cu, seg_seq, seg_ptr, T, L, VARLEN, SPLIT)
    gl, rt, d_row, mask = _decay_consts(g, i_h, BT)
    rk = tl.arange(0, K)
    rv = i_v * BV + tl.arange(0, BV)
    st_off = (i_h * K + rk[:, None]).to(tl.int64) * V + rv[None, :]  # [K, BV]
    G = _load_state(g_end, dht, i_s, n, st_off, SPLIT, HAS_DHT, K, BV, H, K, V)
    q += i_h * K
    k += i_h * K
    do += i_h * V
    dv += i_h * V
    nc = tl.cdiv(end - start, BT)
    for ic in range(nc):
        t0 = start + (nc - 1 - ic) * BT
        rows = t0 + rt
        m = rows < end
        b_q = _tile(q, rows, sq, rk, m)
        b_k = _tile(k, rows, sk, rk, m)
        b_do = _tile(do, rows, sdo, rv, m)
        c, w = _chunk_weights(gl, rt, t0, end, BT)
        A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * (mask * scale)
        dow = b_do.to(tl.float32) * (d_row * scale)[:, None]
        if LOWP:
            b_dv = tl.dot(b_k.to(tl.bfloat16), G.to(tl.bfloat16)) * w[:, None]
            G = tl.dot(tl.trans(b_q), dow.to(b_do.dtype), G * tl.exp2(gl * c))
        else:
            b_dv = tl.dot(b_k.to(tl.float32), G, input_precision=PREC) * w[:, None]
            G = tl.dot(tl.trans(b_q.to(tl.float32)), dow, G * tl.exp2(gl * c), input_precision=PREC)
        b_dv = tl.dot(tl.trans(A).to(b_do.dtype), b_do, b_dv, input_precision=PREC)
        tl.store(dv + rows[:, None] * (H * V) + rv[None, :], b_dv.to(dv.dtype.element_ty), mask=m[:, None])
    if STORE_DH0:
        tl.store(dh0 + n * (H * K * V) + st_off, G)


@triton.jit
def _bwd_dk_kernel(q, v, do, dk, g, dht, g_end, cu, seg_seq, seg_ptr,
                   sq, sv, sdo, scale, T, L,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   VARLEN: tl.constexpr, SPLIT: tl.constexpr, HAS_DHT: tl.constexpr, LOWP: tl.constexpr,
                   PREC: tl.constexpr):
    """Reverse sweep per (segment, head, key block) carrying G[kb, :] [BK, V]:
        dk = scale (B*mask)^T Q + lam^(c-1-j) V G^T,  B = dO V^T,  G <- lam^c G + scale Q[:, kb]^T (lam^(i+1) dO).
    The key-block split is exact (G[kb, :] depends only on q[:, kb])."""
    NK: tl.constexpr = K // BK
    i_k, i_h, i_s = _ids(NK, H)
    n, start, end = _segment(i_s, cu, seg_seq, seg_ptr, T, L, VARLEN, SPLIT)
    gl, rt, d_row, mask = _decay_consts(g, i_h, BT)
    rk = i_k * BK + tl.arange(0, BK)
    rv = tl.arange(0, V)
    st_off = (i_h * K + rk[:, None]).to(tl.int64) * V + rv[None, :]  # [BK, V]
    G = _load_state(g_end, dht, i_s, n, st_off, SPLIT, HAS_DHT, BK, V, H, K, V)
    q += i_h * K
    v += i_h * V
    do += i_h * V
    dk += i_h * K
    nc = tl.cdiv(end - start, BT)
    for ic in range(nc):
        t0 = start + (nc - 1 - ic) * BT
        rows = t0 + rt
        m = rows < end
        b_q = _tile(q, rows, sq, rk, m)
        b_v = _tile(v, rows, sv, rv, m)
        b_do = _tile(do, rows, sdo, rv, m)
        c, w = _chunk_weights(gl, rt, t0, end, BT)
        B = tl.dot(b_do, tl.trans(b_v), input_precision=PREC) * (mask * scale)
        dow = b_do.to(tl.float32) * (d_row * scale)[:, None]
        if LOWP:
            b_dk = tl.dot(b_v.to(tl.bfloat16), tl.trans(G).to(tl.bfloat16)) * w[:, None]
            G = tl.dot(tl.trans(b_q), dow.to(b_do.dtype), G * tl.exp2(gl * c))
        else:
            b_dk = tl.dot(b_v.to(tl.float32), tl.trans(G), input_precision=PREC) * w[:, None]
            G = tl.dot(tl.trans(b_q.to(tl.float32)), dow, G * tl.exp2(gl * c), input_precision=PREC)
        b_dk = tl.dot(tl.trans(B).to(b_q.dtype), b_q, b_dk, input_precision=PREC)
        tl.store(dk + rows[:, None] * (H * K) + rk[None, :], b_dk.to(dk.dtype.element_ty), mask=m[:, None])


@triton.jit
def _decode_kernel(q, k, v, o, g, state, slots, sq, sk, sv, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, USE_SLOTS: tl.constexpr):
    """One token per request: S <- lam S + k^T v in place in its slot, o = scale q S. One program per
    (request, head, value block); the state tile is the only real traffic (read once, written once)."""
    NV: tl.constexpr = V // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_h = (pid // NV) % H
    i_n = (pid // (NV * H)).to(tl.int64)
    if USE_SLOTS:
        slot = tl.load(slots + i_n).to(tl.int64)
    else:
        slot = i_n
    rk = tl.arange(0, K)
    rv = i_v * BV + tl.arange(0, BV)
    p_s = state + ((slot * H + i_h) * K + rk[:, None]) * V + rv[None, :]
    S = tl.load(p_s)
    lam = tl.exp(tl.load(g + i_h).to(tl.float32))
    b_q = tl.load(q + i_n * sq + i_h * K + rk).to(tl.float32)
    b_k = tl.load(k + i_n * sk + i_h * K + rk).to(tl.float32)
    b_v = tl.load(v + i_n * sv + i_h * V + rv).to(tl.float32)
    S = lam * S + b_k[:, None] * b_v[None, :]
    tl.store(p_s, S)
    b_o = tl.sum(S * b_q[:, None], axis=0) * scale
    tl.store(o + (i_n * H + i_h) * V + rv, b_o.to(o.dtype.element_ty))
