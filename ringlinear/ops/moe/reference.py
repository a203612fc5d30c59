"""Sigmoid group-limited top-k router and SwiGLU experts, plain PyTorch (the spec for the fused MoE kernels).

Ties are broken by the lowest index everywhere (stable sorts), so selection is deterministic and identical across
reference, kernels, training and serving.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _topk_lowest_index(x, k):
    """Top-k along the last dim; among equal values the lowest index wins. Returns (values, indices)."""
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def route(x, weight, expert_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    """x [N, h] (any float dtype), weight [E, h], expert_bias [E] fp32 or None.

    Returns topk_idx [N, k] int64, topk_weight [N, k] fp32, logits [N, E] fp32.
    Logits and scores are fp32; the bias only chooses experts; weights come from the unbiased scores.
    """
    N = x.shape[0]
    E = weight.shape[0]
    logits = F.linear(x.float(), weight.float())
    scores = torch.sigmoid(logits)
    sel = scores + expert_bias.float() if expert_bias is not None else scores
    if n_group > 1 and topk_group < n_group:
        grouped = sel.view(N, n_group, E // n_group)
        group_scores = _topk_lowest_index(grouped, 2)[0].sum(-1)  # [N, n_group]
        _, gidx = _topk_lowest_index(group_scores, topk_group)
        gmask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, gidx, True)
        emask = gmask[:, :, None].expand(N, n_group, E // n_group).reshape(N, E)
        sel = sel.masked_fill(~emask, float("-inf"))
    _, topk_idx = _topk_lowest_index(sel, top_k)
    w = torch.gather(scores, 1, topk_idx)
    if norm_topk_prob and top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, w * routed_scaling_factor, logits


def swiglu(x, w_gate, w_up, w_down):
    """Dense SwiGLU MLP in x.dtype: down(silu(gate x) * up x). Weights [I, h], [I, h], [h, I]."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def moe_experts(x, topk_idx, topk_weight, w13, w2):
    """Routed experts. x [N, h]; topk_idx/topk_weight [N, k]; w13 [E, 2I, h] (gate rows then up rows); w2 [E, h, I].

    Each expert runs on its tokens in the model dtype; the weighted sum over k is taken in fp32 in slot order and
    cast back once. Returns [N, h] in x.dtype.
    """
    N, h = x.shape
    k = topk_idx.shape[1]
    inter = w13.shape[1] // 2
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    out = torch.empty(N * k, h, dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = order[start:start + c]
        xe = x[rows // k]
        # .to(): under autocast the expert computes in bf16 while the residual stream x stays fp32
        out[rows] = swiglu(xe, w13[e, :inter], w13[e, inter:], w2[e]).to(out.dtype)
        start += c
    y = (out.view(N, k, h).float() * topk_weight[..., None].float()).sum(1)
    return y.to(x.dtype)


def moe_forward(x, router_weight, expert_bias, w13, w2, shared, *, top_k, n_group, topk_group,
                routed_scaling_factor, norm_topk_prob=True):
    """Full MoE block: routed experts plus the (unweighted) shared expert. `shared` = (w_gate, w_up, w_down) or None.

    Returns (y [N, h], topk_idx, topk_weight, router_logits)."""
    idx, w, logits = route(x, router_weight, expert_bias, top_k, n_group, topk_group, routed_scaling_factor,
                           norm_topk_prob)
    y = moe_experts(x, idx, w, w13, w2)
    if shared is not None:
        y = y + swiglu(x, *shared)
    return y, idx, w, logits
