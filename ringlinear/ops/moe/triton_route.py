"""Triton router (fp32 logits, sigmoid group-limited top-k) and the expert-sorted plan of (token, slot) pairs.

Everything here stays on the device: no host sync, so the MoE can be captured in a CUDA graph. Block sizes are fixed
and independent of the number of tokens, so a row's logits and choice never depend on what else is in the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv, next_pow2, patch_interpreter

patch_interpreter()  # CPU interpreter fixes (runtime loop bounds, bf16 dot); no-op for compiled kernels

# Logits GEMM tiles (fixed for every N: batch invariance). Splitting the experts over programs keeps a small batch
# from streaming the whole router weight through a few SMs: 32-wide expert blocks ran the whole router (logits +
# top-k) in 0.023 ms at 64 tokens against 0.048 ms with 128-wide ones, and within 4% at 1K-8K tokens (H200).
ROUTER_CFG = dict(BLOCK_T=64, BLOCK_E=32, BLOCK_K=64, num_warps=4, num_stages=4)
TOPK_CFG = dict(BLOCK_T=16, num_warps=4)   # selection: a chain of row reductions, latency-bound
# Histogram blocks of 16 tokens: a [16, E] int32 tile stays in registers (64 tokens spilled: ~60 us; a loop over
# 16-token sub-tiles: ~45 us, both H100/H200 measurements) at the price of a longer prefix sum over blocks.
PLAN_BLOCK_T = 16   # tokens per histogram block
PLAN_BLOCK_B = 32   # histogram blocks per step of the single-program prefix sum


def dot_precision(*tensors):
    """tl.dot input precision: fp32 operands must not silently run in TF32 (docs/numerics.md)."""
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


@triton.jit
def _topk_lowest(sel, cols, E: tl.constexpr):
    """One step of an iterative top-k along axis 1: the max of `sel`, lowest column on ties.
    Returns (chosen column [BT], mask of that column [BT, E])."""
    m = tl.max(sel, 1)
    j = tl.min(tl.where(sel == m[:, None], cols[None, :], E), 1)
    j = tl.minimum(j, E - 1)  # NaN rows would find no max: keep the index in range
    return j, cols[None, :] == j[:, None]


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, logit_ptr, N, stride_x, stride_w, H: tl.constexpr, E: tl.constexpr,
                          PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """logits [N, E] fp32 = x [N, H] @ W [E, H]^T; expert blocks of one token block are adjacent programs."""
    NT_E: tl.constexpr = E // BLOCK_E
    pid = tl.program_id(0)
    rows = (pid // NT_E) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (pid % NT_E) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    b_ptrs = w_ptr + cols[None, :] * stride_w + ks[:, None]
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for _ in range(0, H, BLOCK_K):
        a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
        b = tl.load(b_ptrs)
        if PREC == "ieee":
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            # bf16 x bf16 products are exact in fp32 and the MMA accumulates in fp32: an fp32 GEMM of the
            # up-cast inputs without materialising them.
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tl.store(logit_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], acc, mask=rmask[:, None])


@triton.jit
def _router_topk_kernel(logit_ptr, bias_ptr, idx_ptr, wt_ptr, N, scale, E: tl.constexpr, TOPK: tl.constexpr,
                        KP2: tl.constexpr, NG: tl.constexpr, TOPKG: tl.constexpr, HAS_BIAS: tl.constexpr,
                        NORM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Sigmoid scores, bias for selection only, group-limited top-k (group score = sum of its top-2, lowest
    index on ties everywhere), weights from the unbiased scores."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < N
    cols = tl.arange(0, E)
    p = tl.sigmoid(tl.load(logit_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=rmask[:, None],
                           other=0.0))
    sel = p
    if HAS_BIAS:
        sel = p + tl.load(bias_ptr + cols)[None, :]
    if TOPKG < NG:
        EG: tl.constexpr = E // NG
        g = tl.reshape(sel, [BLOCK_T, NG, EG])
        eg = tl.arange(0, EG)
        m1 = tl.max(g, 2)
        first = tl.min(tl.where(g == m1[:, :, None], eg[None, None, :], EG), 2)
        m2 = tl.max(tl.where(eg[None, None, :] == first[:, :, None], float("-inf"), g), 2)
        gscore = m1 + m2  # [BT, NG]: sum of the group's top-2
        gi = tl.arange(0, NG)
        keep = tl.zeros([BLOCK_T, NG], tl.int32)
        for _i in tl.static_range(TOPKG):
            _j, hit = _topk_lowest(gscore, gi, NG)
            keep = tl.where(hit, 1, keep)
            gscore = tl.where(hit, float("-inf"), gscore)
        emask = tl.reshape(tl.broadcast_to(keep[:, :, None], [BLOCK_T, NG, EG]), [BLOCK_T, E])
        sel = tl.where(emask != 0, sel, float("-inf"))

    kk = tl.arange(0, KP2)
    out_idx = tl.zeros([BLOCK_T, KP2], tl.int32)
    out_p = tl.zeros([BLOCK_T, KP2], tl.float32)
    for i in tl.static_range(TOPK):
        j, hit = _topk_lowest(sel, cols, E)
        out_idx = tl.where(kk[None, :] == i, j[:, None], out_idx)
        out_p = tl.where(kk[None, :] == i, tl.sum(tl.where(hit, p, 0.0), 1)[:, None], out_p)
        sel = tl.where(hit, float("-inf"), sel)
    if NORM:
        out_p = out_p / (tl.sum(out_p, 1) + 1e-20)[:, None]
    out_p = out_p * scale
    omask = rmask[:, None] & (kk < TOPK)[None, :]
    offs = rows[:, None].to(tl.int64) * TOPK + kk[None, :]
    tl.store(idx_ptr + offs, out_idx.to(tl.int64), mask=omask)
    tl.store(wt_ptr + offs, out_p, mask=omask)


def router_forward(x, weight, expert_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob):
    """x [N, h], weight [E, h] -> (topk_idx [N, k] int64, topk_weight [N, k] fp32, logits [N, E] fp32)."""
    N, H = x.shape
    E = weight.shape[0]
    if E & (E - 1) or E % n_group:
        raise ValueError(f"fused router needs a power-of-two expert count divisible by n_group (E={E})")
    x = x.contiguous()
    weight = weight.contiguous()
    logits = torch.empty(N, E, dtype=torch.float32, device=x.device)
    idx = torch.empty(N, top_k, dtype=torch.int64, device=x.device)
    wt = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    if N == 0:
        return idx, wt, logits
    cfg = ROUTER_CFG
    be = min(cfg["BLOCK_E"], E)
    _router_logits_kernel[(cdiv(N, cfg["BLOCK_T"]) * (E // be),)](
        x, weight, logits, N, x.stride(0), weight.stride(0), H=H, E=E, PREC=dot_precision(x, weight),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_E=be, BLOCK_K=fit_block(cfg["BLOCK_K"], H), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    grouped = n_group > 1 and topk_group < n_group
    # logits stands in as a never-read pointer when there is no bias
    bias = expert_bias.to(torch.float32).contiguous() if expert_bias is not None else logits
    _router_topk_kernel[(cdiv(N, TOPK_CFG["BLOCK_T"]),)](
        logits, bias, idx, wt, N, float(routed_scaling_factor), E=E, TOPK=top_k, KP2=next_pow2(top_k),
        NG=n_group if grouped else 1, TOPKG=topk_group if grouped else 1, HAS_BIAS=expert_bias is not None,
        NORM=bool(norm_topk_prob and top_k > 1), BLOCK_T=TOPK_CFG["BLOCK_T"], num_warps=TOPK_CFG["num_warps"])
    return idx, wt, logits


@triton.jit
def _router_dx_kernel(dl_ptr, idx_ptr, w_ptr, dx_ptr, N, stride_w, TOPK: tl.constexpr, H: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """dx[t] = sum_s dlogit[t, s] W[idx[t, s]] in fp32, slot order (only the chosen logits carry gradient)."""
    NT_H: tl.constexpr = H // BLOCK_H
    pid = tl.program_id(0)
    rows = (pid // NT_H) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (pid % NT_H) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < N
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for s in tl.static_range(TOPK):
        e = tl.load(idx_ptr + rows * TOPK + s, mask=rmask, other=0)
        d = tl.load(dl_ptr + rows * TOPK + s, mask=rmask, other=0.0)
        wrow = tl.load(w_ptr + e[:, None] * stride_w + cols[None, :], mask=rmask[:, None], other=0.0)
        acc += d[:, None] * wrow.to(tl.float32)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=rmask[:, None])


@triton.jit
def _router_dw_kernel(dl_ptr, x_ptr, pair_ptr, eoff_ptr, dw_ptr, stride_x, TOPK: tl.constexpr, H: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """dW[e] = sum over expert e's pairs, in expert-sorted order, of dlogit[pair] x[token] (fp32)."""
    NT_H: tl.constexpr = H // BLOCK_H
    pid = tl.program_id(0)
    e = pid // NT_H
    cols = (pid % NT_H) * BLOCK_H + tl.arange(0, BLOCK_H)
    end = tl.load(eoff_ptr + e + 1)
    acc = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)  # reduced over rows once at the end (fixed order)
    for r0 in range(tl.load(eoff_ptr + e), end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = rows < end
        pr = tl.load(pair_ptr + rows, mask=m, other=0)
        d = tl.load(dl_ptr + pr, mask=m, other=0.0)
        xt = tl.load(x_ptr + (pr // TOPK)[:, None].to(tl.int64) * stride_x + cols[None, :], mask=m[:, None],
                     other=0.0)
        acc += d[:, None] * xt.to(tl.float32)
    tl.store(dw_ptr + e * H + cols, tl.sum(acc, 0).to(dw_ptr.dtype.element_ty))


def router_backward_sparse(dl_sel, idx, weight, x, pair, eoff):
    """Router GEMM gradients when only the chosen logits carry gradient: dl_sel [N, k] fp32 (d logit of each
    chosen expert) -> (dx [N, h] in x.dtype, dW [E, h] in weight.dtype). Gathers instead of dense fp32 GEMMs."""
    N, k = idx.shape
    E, H = weight.shape
    weight, x, dl_sel = weight.contiguous(), x.contiguous(), dl_sel.contiguous()
    dx = torch.empty(N, H, dtype=x.dtype, device=x.device)
    dw = torch.empty(E, H, dtype=weight.dtype, device=x.device)
    bh = fit_block(256, H)
    if N:
        _router_dx_kernel[(cdiv(N, 16) * (H // bh),)](dl_sel, idx, weight, dx, N, weight.stride(0), TOPK=k,
                                                              H=H, BLOCK_T=16, BLOCK_H=bh, num_warps=4)
    _router_dw_kernel[(E * (H // bh),)](dl_sel, x, pair, eoff, dw, x.stride(0), TOPK=k, H=H, BLOCK_R=32,
                                        BLOCK_H=bh, num_warps=4)
    return dx, dw


def fit_block(block, dim, minimum=16):
    """Largest power of two <= block dividing dim (tiles must not straddle the K or N edge of a weight)."""
    b = block
    while b >= minimum:
        if dim % b == 0:
            return b
        b //= 2
    raise ValueError(f"dimension {dim} is not a multiple of {minimum}: not supported by the fused MoE kernels")


# ---- plan: a stable counting sort of the N*k pairs by expert ------------------------------------------------------

@triton.jit
def _hist_kernel(idx_ptr, hist_ptr, rank_ptr, N, TOPK: tl.constexpr, E: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per block of tokens: pairs per expert (hist [NB, E]) and each pair's rank among its block's pairs of the
    same expert, in pair order (rank [N*k])."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < N
    cols = tl.arange(0, E)
    cnt = tl.zeros([BLOCK_T, E], tl.int32)
    for s in tl.static_range(TOPK):
        e = tl.load(idx_ptr + rows * TOPK + s, mask=rmask, other=-1).to(tl.int32)
        cnt += (cols[None, :] == e[:, None]).to(tl.int32)
    before = tl.cumsum(cnt, 0) - cnt
    tl.store(hist_ptr + pid * E + cols, tl.sum(cnt, 0))
    for s in tl.static_range(TOPK):
        e = tl.load(idx_ptr + rows * TOPK + s, mask=rmask, other=-1).to(tl.int32)
        r = tl.sum(tl.where(cols[None, :] == e[:, None], before, 0), 1)
        for s2 in tl.static_range(s):  # an expert repeated within a row (never from the router, allowed by the API)
            r += (tl.load(idx_ptr + rows * TOPK + s2, mask=rmask, other=-2).to(tl.int32) == e).to(tl.int32)
        tl.store(rank_ptr + rows * TOPK + s, r, mask=rmask)


@triton.jit
def _plan_kernel(hist_ptr, base_ptr, eoff_ptr, NB, E: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: expert offsets eoff [E+1] and each block's first sorted position per expert base [NB, E]."""
    cols = tl.arange(0, E)
    rb = tl.arange(0, BLOCK_B)
    tot = tl.zeros([E], tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        m = (b0 + rb) < NB
        tot += tl.sum(tl.load(hist_ptr + (b0 + rb)[:, None] * E + cols[None, :], mask=m[:, None], other=0), 0)
    start = tl.cumsum(tot, 0) - tot
    tl.store(eoff_ptr + cols, start)
    tl.store(eoff_ptr + E, tl.sum(tot, 0))
    run = start
    for b0 in range(0, NB, BLOCK_B):
        m = (b0 + rb) < NB
        ptrs = (b0 + rb)[:, None] * E + cols[None, :]
        h = tl.load(hist_ptr + ptrs, mask=m[:, None], other=0)
        tl.store(base_ptr + ptrs, tl.cumsum(h, 0) - h + run[None, :], mask=m[:, None])
        run += tl.sum(h, 0)


@triton.jit
def _scatter_kernel(idx_ptr, rank_ptr, base_ptr, pair_ptr, N, TOPK: tl.constexpr, E: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < N
    for s in tl.static_range(TOPK):
        e = tl.load(idx_ptr + rows * TOPK + s, mask=rmask, other=0).to(tl.int32)
        pos = tl.load(base_ptr + pid * E + e, mask=rmask, other=0) + tl.load(rank_ptr + rows * TOPK + s,
                                                                             mask=rmask, other=0)
        tl.store(pair_ptr + pos, rows * TOPK + s, mask=rmask)


def make_plan(topk_idx, num_experts):
    """topk_idx [N, k] -> (sorted_pair [N*k] int32: pair ids t*k+s grouped by expert, pair order within an expert;
    eoff [E+1] int32: expert e owns sorted rows eoff[e]:eoff[e+1])."""
    N, k = topk_idx.shape
    E = num_experts
    dev = topk_idx.device
    idx = topk_idx.contiguous()
    nb = max(cdiv(N, PLAN_BLOCK_T), 1)
    hist = torch.empty(nb, E, dtype=torch.int32, device=dev)
    rank = torch.empty(N * k, dtype=torch.int32, device=dev)
    base = torch.empty(nb, E, dtype=torch.int32, device=dev)
    eoff = torch.empty(E + 1, dtype=torch.int32, device=dev)
    pair = torch.empty(N * k, dtype=torch.int32, device=dev)
    _hist_kernel[(nb,)](idx, hist, rank, N, TOPK=k, E=E, BLOCK_T=PLAN_BLOCK_T, num_warps=4)
    _plan_kernel[(1,)](hist, base, eoff, nb, E=E, BLOCK_B=PLAN_BLOCK_B, num_warps=4)
    _scatter_kernel[(nb,)](idx, rank, base, pair, N, TOPK=k, E=E, BLOCK_T=PLAN_BLOCK_T, num_warps=4)
    return pair, eoff
