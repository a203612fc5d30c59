"""Softmax attention with ONE reduction order over keys, shared by training, prefill and decode (numerics="aligned").

The default paths reduce over keys in whatever order their kernels choose: SDPA/flash in training and prefill,
fixed 512-token partitions merged at the end in paged decode. Equal in exact arithmetic, not bitwise, so a token's
log-prob in the rollout engine differs from the trainer's. Here every query row, whatever call it comes from, is
computed the same way:

- rows are (query position, query head of the kv group) pairs, BLOCK_M = max(16, G) rows per tile, per kv head;
- keys in blocks of BLOCK_N = 64 absolute positions, 0-63, 64-127, ..., always in ascending order, each block a
  [BLOCK_M, D] x [D, 64] product, online softmax in fp32 (running max, sum and output rescaled per block);
- keys after the row's position are -inf; a block with none of the row's keys leaves it unchanged exactly
  (rescale factor exp(0) = 1, weights exp(-inf) = 0), so how far a tile's loop runs does not matter.

A row's result therefore depends only on its query, its keys and the fixed tile shapes: not on the other rows of
its tile, the batch, the prefill chunking, nor on whether keys come packed (training) or from paged blocks.

This file is the plain-PyTorch form (the CPU path and the spec of the Triton kernels in `triton_aligned.py`).
Every product has a fixed shape (rows padded to BLOCK_M, keys to BLOCK_N with zeros), so CPU BLAS rounds a row
the same way in every call. Layouts: q [Tq, H, D]; packed k, v [Tk, KV, D]; paged K, V [rows, KV, D] with
block tables [N, MB]; `q_cu` [N+1] packs the queries, `q_start` [N] is each sequence's first query position.
"""
from __future__ import annotations

import torch

BLOCK_N = 64


def block_m(group: int) -> int:
    """Rows per tile for `group` query heads per kv head."""
    if 16 % group and group % 16:
        raise ValueError(f"query heads per kv head ({group}) must divide 16 or be a multiple of it")
    return max(16, group)


def _keys(n, k, v, k_cu, block_tables, block_size, n_keys):
    """Keys 0..n_keys-1 of sequence n, [n_keys, KV, D], from the packed tensors or through the block table."""
    if block_tables is None:
        s = int(k_cu[n])
        return k[s:s + n_keys], v[s:s + n_keys]
    pos = torch.arange(n_keys, device=k.device)
    rows = block_tables[n].long().to(k.device)[pos // block_size] * block_size + pos % block_size
    return k[rows], v[rows]


# CPU: transcendental functions take a SIMD path for the body of a tensor and a scalar path for its tail (and for
# the tail of each thread's share), which round differently. Products are done on groups of a fixed number of
# tiles, sized below torch's parallel grain and a multiple of 64 elements, so every exp/log runs one way.
_GROUP_ELEMS = 16384


def _one(q, keys, vals, start, scale):
    """q [L, H, D] at positions start.., keys/vals [start+L, KV, D] -> o [L, H, D], lse [L, H] (fp32)."""
    L, H, D = q.shape
    KV = keys.shape[1]
    G = H // KV
    BM = block_m(G)
    acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
    P = max(1, BM // G)                                                 # positions per tile
    TG = max(1, _GROUP_ELEMS // (KV * BM * BLOCK_N))                    # tiles per product group
    nt = -(-L // (P * TG)) * TG
    # rows of one kv head: (position, head in group), padded to whole tile groups: [KV, nt, BM, D]
    qr = q.to(acc_t).reshape(L, KV, G, D).permute(1, 0, 2, 3)          # [KV, L, G, D]
    qr = torch.cat([qr, qr.new_zeros(KV, nt * P - L, G, D)], 1).reshape(KV, nt, BM, D)
    pos = start + torch.arange(nt * P, device=q.device).repeat_interleave(G).view(nt, BM)
    n_keys = start + L
    o = torch.empty(KV, nt, BM, D, dtype=acc_t, device=q.device)
    lse = torch.empty(KV, nt, BM, dtype=acc_t, device=q.device)
    for t0 in range(0, nt, TG):
        qg = qr[:, t0:t0 + TG].reshape(KV * TG, BM, D)
        pg = pos[t0:t0 + TG]                                            # [TG, BM]
        m = torch.full((KV, TG, BM), float("-inf"), dtype=acc_t, device=q.device)
        l_ = torch.zeros(KV, TG, BM, dtype=acc_t, device=q.device)
        acc = torch.zeros(KV, TG, BM, D, dtype=acc_t, device=q.device)
        last = min(n_keys, int(pg.max()) + 1)                           # keys any row of the group can see
        for j0 in range(0, last, BLOCK_N):
            kb = keys[j0:j0 + BLOCK_N].to(acc_t)
            vb = vals[j0:j0 + BLOCK_N].to(acc_t)
            if kb.shape[0] < BLOCK_N:  # zero keys past the end: masked below, fixed product shape
                pad = BLOCK_N - kb.shape[0]
                kb = torch.cat([kb, kb.new_zeros(pad, KV, D)])
                vb = torch.cat([vb, vb.new_zeros(pad, KV, D)])
            kb = kb.permute(1, 2, 0)[:, None].expand(KV, TG, D, BLOCK_N).reshape(KV * TG, D, BLOCK_N)
            vb = vb.permute(1, 0, 2)[:, None].expand(KV, TG, BLOCK_N, D).reshape(KV * TG, BLOCK_N, D)
            s = (torch.bmm(qg, kb) * scale).view(KV, TG, BM, BLOCK_N)
            kpos = j0 + torch.arange(BLOCK_N, device=q.device)
            s = s.masked_fill(kpos[None, None, None, :] > pg[None, :, :, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)
            l_ = l_ * alpha + p.sum(-1)
            pv = torch.bmm(p.view(KV * TG, BM, BLOCK_N), vb).view(KV, TG, BM, D)
            acc = acc * alpha[..., None] + pv
            m = m_new
        o[:, t0:t0 + TG] = acc / l_[..., None]
        lse[:, t0:t0 + TG] = m + torch.log(l_)
    o = o.reshape(KV, nt * P, G, D)[:, :L].permute(1, 0, 2, 3).reshape(L, H, D)
    lse = lse.reshape(KV, nt * P, G)[:, :L].permute(1, 0, 2).reshape(L, H)
    return o.to(q.dtype), lse.float()


def aligned_attention(q, k, v, q_cu, q_start, scale, k_cu=None, block_tables=None, block_size=None,
                      return_lse=False):
    """Causal GQA attention, fixed key-block order. Packed keys: k, v [Tk, KV, D] with `k_cu` [N+1] (sequence n's
    key j at row k_cu[n] + j); paged keys: k, v are the flat caches [rows, KV, D] with `block_tables` [N, MB].
    Returns o [Tq, H, D] in q.dtype (and lse [Tq, H] fp32 with return_lse)."""
    if (k_cu is None) == (block_tables is None):
        raise ValueError("aligned_attention: give k_cu (packed keys) or block_tables (paged keys), not both")
    cu = q_cu.tolist()
    starts = [int(s) for s in torch.as_tensor(q_start).tolist()]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for n in range(len(cu) - 1):
        s, e = cu[n], cu[n + 1]
        if e == s:
            continue
        kk, vv = _keys(n, k, v, k_cu, block_tables, block_size, starts[n] + e - s)
        out[s:e], lse[s:e] = _one(q[s:e], kk, vv, starts[n], scale)
    return (out, lse) if return_lse else out
