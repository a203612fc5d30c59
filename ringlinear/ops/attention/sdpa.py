"""Causal attention through torch SDPA in the model dtype (CUDA's flash / memory-efficient kernels, whose softmax
runs in fp32): the prefill path for 16-bit tensors on CUDA. `backend.use_sdpa` decides when it runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_with_prefix(q, k, v, scale, max_mask_elems: int = 1 << 27):
    """Same contract as reference.attention_with_prefix: q [Tq, H, D] are the last Tq of the Tk positions of
    k, v [Tk, KV, D] (causal). Returns [Tq, H, D] in q.dtype."""
    Tq, H, D = q.shape
    Tk, KV, _ = k.shape
    kh = k.repeat_interleave(H // KV, 1).transpose(0, 1)[None]  # [1, H, Tk, D]
    vh = v.repeat_interleave(H // KV, 1).transpose(0, 1)[None]
    if Tq == Tk:
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kh, vh, is_causal=True, scale=scale)
        return o[0].transpose(0, 1)
    # A chunk continuing a cached prefix: an explicit bottom-right causal mask, in row blocks so the mask stays
    # small (torch's causal_lower_right bias failed on CUDA for long prefixes in our runs).
    out = torch.empty_like(q)
    off = Tk - Tq
    rows = max(1, min(Tq, max_mask_elems // Tk))
    for a in range(0, Tq, rows):
        b = min(Tq, a + rows)
        keys = off + b
        mask = torch.arange(keys, device=q.device)[None, :] <= (off + torch.arange(a, b, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], kh[:, :, :keys], vh[:, :, :keys],
                                           attn_mask=mask, scale=scale)
        out[a:b] = o[0].transpose(0, 1)
    return out
