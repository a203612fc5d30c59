"""Paged GQA decode attention in Triton (flash-decoding with a fixed split size).

One query token per sequence over its paged KV. Work is split along the context into partitions of a FIXED number
of tokens (PART), never chosen from the batch or the total token count, and the partial results are merged in
partition order by a second kernel: a sequence's result is bitwise the same whatever else is in the batch
(docs/numerics.md), and the grid depends only on the block-table width, so a decode step can be captured in a CUDA
graph.

q [B, H, D]; K, V flat [rows, KV, D] (row = block * block_size + offset); block_tables [B, MB] int;
context_lens [B] int (>= 1). Softmax statistics and accumulation in fp32; P·V on the tensor cores in the model dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import next_pow2, patch_interpreter

PART = 512  # tokens per partition
BLOCK_N = 64  # tokens per inner tile


@triton.jit
def _paged_partial(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, scale,
                   stride_bt, MB, NSPLIT,
                   H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                   BS: tl.constexpr, PART: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(len_ptr + b).to(tl.int32)
    g = tl.arange(0, BG)
    d = tl.arange(0, D)
    gmask = g < G
    q = tl.load(q_ptr + (b * H + kvh * G + g)[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    start = sp * PART
    for off in range(0, PART, BLOCK_N):
        pos = start + off + tl.arange(0, BLOCK_N)
        valid = pos < ctx
        blk = tl.load(bt_ptr + b * stride_bt + pos // BS, mask=valid & (pos // BS < MB), other=0).to(tl.int64)
        row = blk * BS + pos % BS
        kv_off = (row * KVH + kvh)[:, None] * D + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BG, BLOCK_N] fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A tile with no valid token keeps m at -inf: use 0 as the shift so exp() stays finite.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    base = (b * KVH + kvh) * NSPLIT + sp
    tl.store(m_ptr + base * BG + g, m_i)
    tl.store(l_ptr + base * BG + g, l_i)
    tl.store(acc_ptr + (base * BG + g)[:, None] * D + d[None, :], acc)


@triton.jit
def _paged_merge(m_ptr, l_ptr, acc_ptr, len_ptr, o_ptr, NSPLIT,
                 H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                 PART: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    gi = h % G
    d = tl.arange(0, D)
    ctx = tl.load(len_ptr + b).to(tl.int32)
    n = (ctx + PART - 1) // PART  # only this sequence's own partitions, merged in order
    base0 = ((b * KVH + kvh) * NSPLIT) * BG + gi
    M = tl.load(m_ptr + base0)
    for sp in range(1, n):
        M = tl.maximum(M, tl.load(m_ptr + base0 + sp * BG))
    w = tl.exp(tl.load(m_ptr + base0) - M)
    L = w * tl.load(l_ptr + base0)
    acc = w * tl.load(acc_ptr + base0 * D + d)
    for sp in range(1, n):
        base = base0 + sp * BG
        w = tl.exp(tl.load(m_ptr + base) - M)
        L += w * tl.load(l_ptr + base)
        acc += w * tl.load(acc_ptr + base * D + d)
    tl.store(o_ptr + (b * H + h) * D + d, (acc / L).to(o_ptr.dtype.element_ty))


def paged_decode_attention(q, K, V, block_tables, context_lens, block_size: int, scale: float, out=None):
    patch_interpreter()
    B, H, D = q.shape
    KVH = K.shape[1]
    if H % KVH:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {KVH}")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim {D} must be a power of two >= 16 for the paged decode kernel")
    G = H // KVH
    BG = max(16, next_pow2(G))
    MB = block_tables.shape[1]
    nsplit = max(1, -(-MB * block_size // PART))
    f32 = dict(dtype=torch.float32, device=q.device)
    m = torch.empty(B, KVH, nsplit, BG, **f32)
    l_ = torch.empty(B, KVH, nsplit, BG, **f32)
    acc = torch.empty(B, KVH, nsplit, BG, D, **f32)
    q = q.contiguous()
    bt = block_tables.contiguous()
    lens = context_lens.contiguous()
    _paged_partial[(B, KVH, nsplit)](q, K, V, bt, lens, m, l_, acc, scale, bt.stride(0), MB, nsplit,
                                     H=H, KVH=KVH, G=G, BG=BG, D=D, BS=block_size, PART=PART, BLOCK_N=BLOCK_N,
                                     num_warps=4)
    o = out if out is not None else torch.empty_like(q)
    _paged_merge[(B, H)](m, l_, acc, lens, o, nsplit, H=H, KVH=KVH, G=G, BG=BG, D=D, PART=PART, num_warps=1)
    return o
