"""Chunk-aligned lightning attention (numerics="aligned"), plain PyTorch: the CPU path and the spec of the kernels.

The chunked form (training, prefill) and the one-token recurrence (default decode) are equal in exact arithmetic,
not bitwise. Aligned mode computes every position with the chunked arithmetic, whichever call it is in:

- chunks of C = 64 tokens counted from the sequence's token 0, each computed at its full shape (missing rows are
  zeros), so a row's products have the same shapes in every call;
- the state kept per sequence is the one at the last chunk boundary; the tokens of the open (partial) chunk keep
  their k and v in an open-chunk buffer [slots, C, H, D];
- prefill (pieces that start on chunk boundaries) folds only complete chunks into the state and writes the tail's
  k, v into the buffer; decode appends its token's k, v to the buffer, computes the token's row of the open chunk
  exactly as the chunked form does, and folds the chunk into the state when it closes.

Row i of a chunk reads only q_i, the chunk's k, v rows j <= i (the causal decay mask is exactly 0 beyond) and the
boundary state, so the zeros of rows not yet seen change nothing. Layouts as in `reference.py`.
"""
from __future__ import annotations

import torch

C = 64  # the chunk of the aligned arithmetic (the Triton kernels' BT)


def _consts(g, dtype):
    """Per head [H] log decay -> (causal decay mask [H, C, C], row decay lam^(i+1) [H, C], fold weights
    lam^(C-1-j) [H, C], chunk decay lam^C [H]): all for the full chunk shape."""
    g = g.to(dtype)
    i = torch.arange(C, device=g.device, dtype=dtype)
    diff = i[:, None] - i[None, :]
    mask = torch.exp(g[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
    return mask, torch.exp(g[:, None] * (i + 1)), torch.exp(g[:, None] * (C - 1 - i)), torch.exp(g * C)


def _pad(x):
    """[c, H, D] -> [H, C, D], zero rows past c."""
    if x.shape[0] < C:
        x = torch.cat([x, x.new_zeros(C - x.shape[0], *x.shape[1:])])
    return x.transpose(0, 1)


def _chunk_out(qc, kc, vc, S, consts, scale):
    """One chunk, all heads, full shape: qc, kc [H, C, D], vc [H, C, Dv], S [H, D, Dv] -> o [H, C, Dv]."""
    mask, row_decay, _, _ = consts
    o_intra = ((qc @ kc.transpose(1, 2)) * mask) @ vc
    o_inter = (qc * row_decay[:, :, None]) @ S
    return scale * (o_intra + o_inter)


def _fold(S, kc, vc, consts):
    """State after a complete chunk: lam^C S + sum_j lam^(C-1-j) k_j^T v_j."""
    _, _, w, lam_c = consts
    return lam_c[:, None, None] * S + (kc * w[:, :, None]).transpose(1, 2) @ vc


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lightning_attn_aligned(q, k, v, g_gamma, scale=None, cu_seqlens=None):
    """Training / scoring forward with aligned arithmetic (zero initial state). q, k, v [B, T, H, D] (B == 1 when
    packed by cu_seqlens). Returns o [B, T, H, Dv] in q.dtype (differentiable through autograd)."""
    B, T, H, D = q.shape
    acc = _acc(q)
    scale = D ** -0.5 if scale is None else scale
    consts = _consts(g_gamma, acc)
    segs = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    outs = []
    for b, s, e in segs:
        S = torch.zeros(H, D, v.shape[-1], dtype=acc, device=q.device)
        for c0 in range(s, e, C):
            c1 = min(e, c0 + C)
            qc, kc, vc = (_pad(x[b, c0:c1].to(acc)) for x in (q, k, v))
            outs.append(_chunk_out(qc, kc, vc, S, consts, scale)[:, :c1 - c0].transpose(0, 1))
            if c1 - c0 == C:
                S = _fold(S, kc, vc, consts)
    o = torch.cat(outs, 0) if outs else q.new_zeros(0, H, v.shape[-1], dtype=acc)
    return o.reshape(B, T, H, -1).to(q.dtype) if cu_seqlens is None else o[None].to(q.dtype)


def lightning_attn_prefill_aligned(q, k, v, g_gamma, state, open_k, open_v, slot_ids, cu_seqlens, starts,
                                   scale=None):
    """Serving prefill from state slots, aligned: q, k, v [1, T, H, D] packed by cu_seqlens [N+1]; state
    [S, H, D, Dv] fp32 (boundary states), open_k/open_v [S, C, H, D] open-chunk buffers; starts: each piece's first
    position (multiples of C). Complete chunks fold into state[slot]; the tail's k, v go to the buffers."""
    _, T, H, D = q.shape
    acc = state.dtype
    scale = D ** -0.5 if scale is None else scale
    consts = _consts(g_gamma, acc)
    o = torch.empty(T, H, v.shape[-1], dtype=q.dtype, device=q.device)
    cu = cu_seqlens.tolist()
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        if int(starts[n]) % C:
            raise ValueError(f"aligned prefill must start on a chunk boundary (multiple of {C}), got {int(starts[n])}")
        slot = int(slot_ids[n])
        S = state[slot].clone()
        for c0 in range(s, e, C):
            c1 = min(e, c0 + C)
            qc, kc, vc = (_pad(x[0, c0:c1].to(acc)) for x in (q, k, v))
            o[c0:c1] = _chunk_out(qc, kc, vc, S, consts, scale)[:, :c1 - c0].transpose(0, 1).to(q.dtype)
            if c1 - c0 == C:
                S = _fold(S, kc, vc, consts)
            else:
                open_k[slot, :c1 - c0] = k[0, c0:c1]
                open_v[slot, :c1 - c0] = v[0, c0:c1]
        state[slot] = S
    return o[None]


def lightning_attn_decode_aligned(q, k, v, g_gamma, state, open_k, open_v, slot_ids, positions, scale=None,
                                  out=None):
    """One token per request, aligned: q, k, v [N, H, D]; positions [N] (each token's position in its sequence).
    Appends k, v to the open chunk of its slot, returns o [N, H, Dv]; a chunk that closes folds into the state."""
    N, H, D = q.shape
    acc = state.dtype
    scale = D ** -0.5 if scale is None else scale
    consts = _consts(g_gamma, acc)
    o = out if out is not None else torch.empty(N, H, v.shape[-1], dtype=q.dtype, device=q.device)
    for n in range(N):  # one sequence at a time: the same [H, C, D] product shapes as training
        slot, i = int(slot_ids[n]), int(positions[n]) % C
        open_k[slot, i] = k[n]
        open_v[slot, i] = v[n]
        qc = _pad(q[n:n + 1].to(acc))                                  # q at row 0 ...
        qc = torch.roll(qc, i, dims=1)                                  # ... moved to row i (rest zeros)
        kc, vc = _pad(open_k[slot, :i + 1].to(acc)), _pad(open_v[slot, :i + 1].to(acc))
        o[n] = _chunk_out(qc, kc, vc, state[slot], consts, scale)[:, i].to(o.dtype)
        if i == C - 1:
            state[slot] = _fold(state[slot], kc, vc, consts)
    return o
