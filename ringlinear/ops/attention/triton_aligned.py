"""Triton kernels of the fixed-order softmax attention (`aligned.py` is the spec): one forward used by training,
engine prefill and paged decode, and a backward for training.

Forward: one program per (sequence, row tile, kv head). A tile holds BLOCK_M rows, each a (query position, query
head of the kv group) pair, so the G heads that share a kv head share its key loads. Keys are visited in blocks of
BLOCK_N = 64 absolute positions in ascending order from position 0, with fp32 online softmax. Tile shapes, warps and
the loop are the same in every call, so a row's bits do not depend on the call it comes from. Keys are read either
packed (training: k [Tk, KV, D] by k_cu) or from the paged cache through block tables (prefill, decode).

Backward (packed keys, training only; needs no alignment, only exactness): dK/dV per (sequence, key block, kv
head) sweeping the query tiles that see the block, dQ per (sequence, row tile, kv head) sweeping key blocks; the
G heads of a group are rows of the same tile, so their contributions to dK/dV sum inside the program: no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv, patch_interpreter
from .aligned import BLOCK_N, block_m

patch_interpreter()

NUM_WARPS = 4
BWD_BLOCK_M = 64  # backward row tiles: bigger (the backward needs no alignment)


@triton.jit
def _rows(q_cu, q_start, n, t, BM: tl.constexpr, G: tl.constexpr):
    """Rows of tile t of sequence n: (query index in the packed q or -1, head in group, absolute position)."""
    P: tl.constexpr = BM // G
    r = tl.arange(0, BM)
    qs = tl.load(q_cu + n).to(tl.int64)
    ql = tl.load(q_cu + n + 1).to(tl.int64) - qs
    pi = t * P + r // G
    valid = pi < ql
    pos = tl.load(q_start + n).to(tl.int64) + pi
    return tl.where(valid, qs + pi, -1), r % G, pos, valid


@triton.jit
def _kv_rows(k_cu, bt, n, kp, stride_bt, BS: tl.constexpr, PAGED: tl.constexpr):
    """Flat rows of key positions kp of sequence n in the K/V tensors."""
    if PAGED:
        blk = tl.load(bt + n * stride_bt + kp // BS).to(tl.int64)
        return blk * BS + kp % BS
    return tl.load(k_cu + n).to(tl.int64) + kp


@triton.jit
def _fwd_kernel(q, k, v, o, lse, q_cu, q_start, k_cu, bt, scale, stride_bt, max_tiles,
                H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BS: tl.constexpr, PAGED: tl.constexpr, STORE_LSE: tl.constexpr,
                PREC: tl.constexpr):
    pid = tl.program_id(0)
    kvh = pid % KVH
    t = (pid // KVH) % max_tiles
    n = pid // (KVH * max_tiles)
    qi, g, pos, valid = _rows(q_cu, q_start, n, t, BM, G)
    if tl.max(valid.to(tl.int32), 0) == 0:
        return
    d = tl.arange(0, D)
    h = kvh * G + g
    qv = tl.load(q + (tl.maximum(qi, 0) * H + h)[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    last = tl.max(tl.where(valid, pos, 0), 0) + 1  # keys any row of this tile can see
    for j0 in range(0, last, BN):
        kp = j0 + tl.arange(0, BN)
        kmask = kp < last
        rows = _kv_rows(k_cu, bt, n, tl.where(kmask, kp, 0), stride_bt, BS, PAGED)
        off = (rows * KVH + kvh)[:, None] * D + d[None, :]
        kb = tl.load(k + off, mask=kmask[:, None], other=0.0)
        vb = tl.load(v + off, mask=kmask[:, None], other=0.0)
        s = tl.dot(qv, tl.trans(kb), input_precision=PREC) * scale
        s = tl.where(kp[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    dst = (tl.maximum(qi, 0) * H + h)
    tl.store(o + dst[:, None] * D + d[None, :], out.to(o.dtype.element_ty), mask=valid[:, None])
    if STORE_LSE:
        tl.store(lse + dst, m_i + tl.log(l_i), mask=valid)


def _prec(x):
    return "ieee" if x.dtype == torch.float32 else "tf32"


def aligned_forward(q, k, v, q_cu, q_start, scale, max_q, k_cu=None, block_tables=None, block_size=1,
                    want_lse=False, out=None):
    """q [Tq, H, D]; k, v packed [Tk, KV, D] (k_cu) or flat paged caches (block_tables [N, MB]); q_cu [N+1],
    q_start [N] on the device; max_q: a host bound on queries per sequence (grid size). -> o, lse or None."""
    Tq, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    BM = block_m(G)
    P = max(1, BM // G)
    N = q_cu.numel() - 1
    paged = block_tables is not None
    o = out if out is not None else torch.empty_like(q)
    lse = torch.empty(Tq, H, dtype=torch.float32, device=q.device) if want_lse else o
    max_tiles = max(1, -(-int(max_q) // P))
    bt = block_tables if paged else q_cu
    if N and Tq:
        _fwd_kernel[(N * max_tiles * KVH,)](
            q, k, v, o, lse, q_cu, q_start, k_cu if k_cu is not None else q_cu, bt, float(scale),
            bt.stride(0) if paged else 0, max_tiles, H=H, KVH=KVH, G=G, D=D, BM=BM, BN=BLOCK_N,
            BS=block_size, PAGED=paged, STORE_LSE=want_lse, PREC=_prec(q), num_warps=NUM_WARPS,
            enable_fp_fusion=False)  # no compiler-chosen fma contraction: the same rounding in every variant
    return o, (lse if want_lse else None)


# ---------------------------------------------------------------------------------------------------------- backward

@triton.jit
def _delta_kernel(o, do, delta, n, D: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, D)
    m = r < n
    x = tl.load(o + r[:, None].to(tl.int64) * D + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    y = tl.load(do + r[:, None].to(tl.int64) * D + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(delta + r, tl.sum(x * y, 1), mask=m)


@triton.jit
def _bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, cu, scale, max_blocks,
                     H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    kvh = pid % KVH
    jb = (pid // KVH) % max_blocks
    n = pid // (KVH * max_blocks)
    s0 = tl.load(cu + n).to(tl.int64)
    L = tl.load(cu + n + 1).to(tl.int64) - s0
    j0 = jb * BN
    if j0 >= L:
        return
    d = tl.arange(0, D)
    kp = j0 + tl.arange(0, BN)
    kmask = kp < L
    koff = ((s0 + kp) * KVH + kvh)[:, None] * D + d[None, :]
    kb = tl.load(k + koff, mask=kmask[:, None], other=0.0)
    vb = tl.load(v + koff, mask=kmask[:, None], other=0.0)
    dk_acc = tl.zeros([BN, D], tl.float32)
    dv_acc = tl.zeros([BN, D], tl.float32)
    P: tl.constexpr = BM // G
    r = tl.arange(0, BM)
    # query tiles whose positions reach this key block: positions >= j0
    for t in range(j0 // P, tl.cdiv(L, P)):
        pi = t * P + r // G
        valid = pi < L
        h = kvh * G + r % G
        qrow = (s0 + tl.where(valid, pi, 0)) * H + h
        qv = tl.load(q + qrow[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        dov = tl.load(do + qrow[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        lse_r = tl.load(lse + qrow, mask=valid, other=0.0)
        dl_r = tl.load(delta + qrow, mask=valid, other=0.0)
        s = tl.dot(qv, tl.trans(kb), input_precision=PREC) * scale
        ok = (kp[None, :] <= pi[:, None]) & valid[:, None] & kmask[None, :]
        p = tl.where(ok, tl.exp(s - lse_r[:, None]), 0.0)                        # [BM, BN]
        dv_acc += tl.dot(tl.trans(p.to(dov.dtype)), dov, input_precision=PREC)
        dp = tl.dot(dov, tl.trans(vb), input_precision=PREC)
        ds = p * (dp - dl_r[:, None]) * scale
        dk_acc += tl.dot(tl.trans(ds.to(qv.dtype)), qv, input_precision=PREC)
    tl.store(dk + koff, dk_acc.to(dk.dtype.element_ty), mask=kmask[:, None])
    tl.store(dv + koff, dv_acc.to(dv.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _bwd_dq_kernel(q, k, v, do, lse, delta, dq, cu, scale, max_tiles,
                   H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    kvh = pid % KVH
    t = (pid // KVH) % max_tiles
    n = pid // (KVH * max_tiles)
    s0 = tl.load(cu + n).to(tl.int64)
    L = tl.load(cu + n + 1).to(tl.int64) - s0
    P: tl.constexpr = BM // G
    r = tl.arange(0, BM)
    pi = t * P + r // G
    valid = pi < L
    if tl.max(valid.to(tl.int32), 0) == 0:
        return
    d = tl.arange(0, D)
    h = kvh * G + r % G
    qrow = (s0 + tl.where(valid, pi, 0)) * H + h
    qv = tl.load(q + qrow[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    dov = tl.load(do + qrow[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    lse_r = tl.load(lse + qrow, mask=valid, other=0.0)
    dl_r = tl.load(delta + qrow, mask=valid, other=0.0)
    acc = tl.zeros([BM, D], tl.float32)
    last = tl.max(tl.where(valid, pi, 0), 0) + 1
    for j0 in range(0, last, BN):
        kp = j0 + tl.arange(0, BN)
        kmask = kp < last
        koff = ((s0 + tl.where(kmask, kp, 0)) * KVH + kvh)[:, None] * D + d[None, :]
        kb = tl.load(k + koff, mask=kmask[:, None], other=0.0)
        vb = tl.load(v + koff, mask=kmask[:, None], other=0.0)
        s = tl.dot(qv, tl.trans(kb), input_precision=PREC) * scale
        ok = (kp[None, :] <= pi[:, None]) & valid[:, None]
        p = tl.where(ok, tl.exp(s - lse_r[:, None]), 0.0)
        dp = tl.dot(dov, tl.trans(vb), input_precision=PREC)
        ds = p * (dp - dl_r[:, None]) * scale
        acc += tl.dot(ds.to(kb.dtype), kb, input_precision=PREC)
    tl.store(dq + qrow[:, None] * D + d[None, :], acc.to(dq.dtype.element_ty), mask=valid[:, None])


def aligned_backward(do, q, k, v, o, lse, cu, scale, max_len):
    """Gradients of the packed training call (q_start = 0, k_cu = q_cu = cu). Returns dq, dk, dv."""
    T, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    BM = max(BWD_BLOCK_M, block_m(G))
    P = BM // G
    N = cu.numel() - 1
    do = do.contiguous()
    delta = torch.empty(T, H, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if T == 0:
        return dq, dk.zero_(), dv.zero_()
    _delta_kernel[(cdiv(T * H, 64),)](o, do, delta, T * H, D=D, BR=64, num_warps=4)
    prec = _prec(q)
    nb = max(1, -(-int(max_len) // BLOCK_N))
    _bwd_dkdv_kernel[(N * nb * KVH,)](q, k, v, do, lse, delta, dk, dv, cu, float(scale), nb, H=H, KVH=KVH, G=G,
                                      D=D, BM=BM, BN=BLOCK_N, PREC=prec, num_warps=NUM_WARPS)
    nt = max(1, -(-int(max_len) // P))
    _bwd_dq_kernel[(N * nt * KVH,)](q, k, v, do, lse, delta, dq, cu, float(scale), nt, H=H, KVH=KVH, G=G, D=D,
                                    BM=BM, BN=BLOCK_N, PREC=prec, num_warps=NUM_WARPS)
    return dq, dk, dv


class _AlignedVarlenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, scale, max_len):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        zeros = torch.zeros(cu.numel() - 1, dtype=torch.int64, device=q.device)
        o, lse = aligned_forward(q, k, v, cu, zeros, scale, max_len, k_cu=cu, want_lse=True)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.scale, ctx.max_len = scale, max_len
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = aligned_backward(do, q, k, v, o, lse, cu, ctx.scale, ctx.max_len)
        return dq, dk, dv, None, None, None


def aligned_causal_varlen(q, k, v, cu_seqlens, scale, max_seqlen):
    """Training: packed documents (queries and keys alike), differentiable. q [T, H, D], k, v [T, KV, D]."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _AlignedVarlenFn.apply(q, k, v, cu, float(scale), int(max_seqlen))
