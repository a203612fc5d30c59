"""Lightning attention (linear attention with a constant per-head decay), plain PyTorch: the spec and the CPU path.

Per head h with log decay g_h <= 0 and state S in R^{D x D} (key dim x value dim), in fp32 (fp64 for fp64 inputs):

    S_t = exp(g_h) * S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t                       (scale defaults to D^-0.5; the current token has weight 1)

Layouts: q, k, v [B, T, H, D]; g_gamma [H] fp32; states [N, H, D, D]. With `cu_seqlens` (int tensor [N+1]) the
batch is packed: B must be 1 and sequence n owns tokens cu_seqlens[n]:cu_seqlens[n+1]; states never cross a
boundary. Outputs are in q's dtype, final states fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(q, k, v, g_gamma, initial_state, cu_seqlens):
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be [B, T, H, D] with equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, H, D = q.shape
    if g_gamma.shape != (H,):
        raise ValueError(f"g_gamma must be [H]={H}, got {tuple(g_gamma.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed input (cu_seqlens) needs B == 1, got B={B}")
        if int(cu_seqlens[-1]) != T or int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens must run from 0 to T={T}, got {cu_seqlens.tolist()}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, H, D, v.shape[-1]):
        raise ValueError(f"initial_state must be [N, H, D, Dv]={(N, H, D, v.shape[-1])}, got "
                         f"{tuple(initial_state.shape)}")
    return N


def _segments(B, T, cu_seqlens):
    """(batch index, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cs = cu_seqlens.tolist()
    return [(0, cs[n], cs[n + 1]) for n in range(len(cs) - 1)]


def lightning_attn_recurrent(q, k, v, g_gamma, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None):
    """Token-by-token recurrence. Returns (o [B, T, H, Dv], final_state [N, H, D, Dv] or None)."""
    _check(q, k, v, g_gamma, initial_state, cu_seqlens)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    acc = _acc_dtype(q)
    scale = D ** -0.5 if scale is None else scale
    lam = torch.exp(g_gamma.to(acc))[:, None, None]  # [H, 1, 1]
    o = torch.empty(B, T, H, Dv, dtype=acc, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(_segments(B, T, cu_seqlens)):
        S = (initial_state[n].to(acc).clone() if initial_state is not None
             else torch.zeros(H, D, Dv, dtype=acc, device=q.device))
        for t in range(s, e):
            kt, vt, qt = k[b, t].to(acc), v[b, t].to(acc), q[b, t].to(acc)
            S = lam * S + kt[:, :, None] * vt[:, None, :]
            o[b, t] = scale * torch.einsum("hd,hde->he", qt, S)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def _chunked_one(q, k, v, g, scale, S, C):
    """One sequence, all heads. q, k [T, H, D], v [T, H, Dv] (acc dtype), g [H], S [H, D, Dv]. Returns o, S."""
    T = q.shape[0]
    outs = []
    for s in range(0, T, C):
        qc, kc, vc = (x[s:s + C].transpose(0, 1) for x in (q, k, v))  # [H, c, D]
        c = qc.shape[1]
        i = torch.arange(c, device=q.device, dtype=g.dtype)
        diff = i[:, None] - i[None, :]
        # M_ij = exp(g (i - j)) for i >= j; masking before exp avoids overflow for i < j.
        mask = torch.exp(g[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        o_intra = ((qc @ kc.transpose(1, 2)) * mask) @ vc
        o_inter = (qc * torch.exp(g[:, None] * (i + 1))[:, :, None]) @ S
        outs.append((scale * (o_intra + o_inter)).transpose(0, 1))
        w = torch.exp(g[:, None] * (c - 1 - i))[:, :, None]  # decay of token j to the chunk end
        S = torch.exp(g * c)[:, None, None] * S + (kc * w).transpose(1, 2) @ vc
    o = torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    return o, S


def lightning_attn(q, k, v, g_gamma, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   chunk_size=64, aligned=False):
    """Chunked form (the prefill/training algorithm). Same signature and results as the recurrent form.

    Returns (o [B, T, H, Dv] in q.dtype, final_state [N, H, D, Dv] fp32 or None). aligned: the fixed-shape chunk
    arithmetic that aligned serving reproduces bit for bit (aligned.py; zero initial state, no final state).
    """
    _check(q, k, v, g_gamma, initial_state, cu_seqlens)
    if aligned:
        if initial_state is not None or output_final_state:
            raise ValueError("aligned lightning attention starts from a zero state and returns no final state")
        from .aligned import lightning_attn_aligned
        return lightning_attn_aligned(q, k, v, g_gamma, scale=scale, cu_seqlens=cu_seqlens), None
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    acc = _acc_dtype(q)
    scale = D ** -0.5 if scale is None else scale
    g = g_gamma.to(acc)
    o = torch.empty(B, T, H, Dv, dtype=acc, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(_segments(B, T, cu_seqlens)):
        S = (initial_state[n].to(acc) if initial_state is not None
             else torch.zeros(H, D, Dv, dtype=acc, device=q.device))
        o_n, S = _chunked_one(q[b, s:e].to(acc), k[b, s:e].to(acc), v[b, s:e].to(acc), g, scale, S, chunk_size)
        o[b, s:e] = o_n
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def lightning_attn_decode(q, k, v, g_gamma, state, slot_ids=None, scale=None, out=None):
    """One token per request; updates `state[slot_ids]` in place.

    q, k, v [N, H, D]; state [S, H, D, Dv] fp32 pool; slot_ids [N] int (None: 0..N-1); `out` [N, H, Dv] optional
    preallocated output. Returns o [N, H, Dv].
    """
    N, H, D = q.shape
    if slot_ids is None:
        slot_ids = torch.arange(N, device=q.device)
    scale = D ** -0.5 if scale is None else scale
    acc = state.dtype
    lam = torch.exp(g_gamma.to(acc))[None, :, None, None]
    S = lam * state[slot_ids] + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    state[slot_ids] = S
    o = (scale * torch.einsum("nhd,nhde->nhe", q.to(acc), S)).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def lightning_attn_prefill(q, k, v, g_gamma, state, slot_ids, cu_seqlens, scale=None, chunk_size=64, plans=None,
                           segmented=False):
    """Serving prefill: continue each packed sequence from its state slot and write the new state back.

    q, k, v [1, T, H, D] packed by cu_seqlens [N+1]; state [S, H, D, Dv] fp32 pool; slot_ids [N]. Returns o.
    A fresh request must have its slot zeroed by the caller. plans, segmented: the kernels' launch-plan cache and
    a launch hint (unused here).
    """
    o, final = lightning_attn(q, k, v, g_gamma, scale=scale, initial_state=state[slot_ids],
                              output_final_state=True, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    state[slot_ids] = final.to(state.dtype)
    return o
