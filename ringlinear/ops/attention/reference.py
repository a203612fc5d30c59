"""Causal GQA softmax attention through torch SDPA, computed in fp32 (softmax in fp32, cast once)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_with_prefix(q, k, v, scale):
    """One sequence. q [Tq, H, D] are the last Tq of the Tk positions in k, v [Tk, KV, D].

    Query i sits at absolute position Tk - Tq + i and sees keys 0..Tk-Tq+i. Returns [Tq, H, D] in q.dtype.
    """
    Tq, H, D = q.shape
    Tk, KV, _ = k.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = H // KV
    qh = q.to(acc).transpose(0, 1)  # [H, Tq, D]
    kh = k.to(acc).transpose(0, 1).repeat_interleave(rep, 0)
    vh = v.to(acc).transpose(0, 1).repeat_interleave(rep, 0)
    if Tq == Tk:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        mask = torch.arange(Tk, device=q.device)[None, :] <= qpos
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(0, 1).to(q.dtype)


def prefix_attention_varlen(q, k, v, cu_q, cu_k, scale):
    """Packed pieces continuing a cached prefix. Piece n: queries q[cu_q[n]:cu_q[n+1]] are the last of the keys
    k, v[cu_k[n]:cu_k[n+1]] (bottom-right causal, as attention_with_prefix). q [Tq, H, D], k, v [Tk, KV, D]."""
    out = torch.empty_like(q)
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for n in range(len(qs) - 1):
        out[qs[n]:qs[n + 1]] = attention_with_prefix(q[qs[n]:qs[n + 1]], k[ks[n]:ks[n + 1]], v[ks[n]:ks[n + 1]], scale)
    return out


def causal_attention_varlen(q, k, v, cu_seqlens, scale):
    """Packed sequences without cache. q [T, H, D], k, v [T, KV, D], cu_seqlens [N+1]. Returns [T, H, D]."""
    out = torch.empty_like(q)
    cs = cu_seqlens.tolist()
    for n in range(len(cs) - 1):
        s, e = cs[n], cs[n + 1]
        if e > s:
            out[s:e] = attention_with_prefix(q[s:e], k[s:e], v[s:e], scale)
    return out


def paged_decode_attention(q, K, V, block_tables, context_lens, block_size: int, scale: float, out=None):
    """One query per sequence over its paged KV. q [B, H, D]; K, V flat [rows, KV, D] (row = block * block_size +
    offset); block_tables [B, MB]; context_lens [B] (>= 1). Returns [B, H, D] in q.dtype (fp32 softmax)."""
    o = out if out is not None else torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        pos = torch.arange(n, device=q.device)
        rows = block_tables[b].long()[pos // block_size] * block_size + pos % block_size
        o[b] = attention_with_prefix(q[b][None], K[rows], V[rows], scale)[0]
    return o
