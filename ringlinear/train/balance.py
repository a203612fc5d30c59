"""MoE load balancing as in Ling-2.0 / DeepSeek-V3.

- Aux-loss-free: after every optimizer step each MoE layer's `gate.expert_bias` moves by `rate * sign(mean - load)`
  per expert, from the step's global per-expert token counts (summed over micro-batches and processes, so every
  process applies the same update). The bias only chooses experts; the weights come from the unbiased scores.
- Optional sequence-level auxiliary loss: per row, alpha * sum_e f_e * P_e with f_e = E/(K*T) * (tokens routed to
  e) and P_e = mean over the row's tokens of the normalised sigmoid scores s_e / sum_j s_j.
- Logged imbalance: max load / mean load per layer (1.0 = perfectly even).
"""
from __future__ import annotations

import torch

from ..models.moe import SparseMoeBlock


class MoEBalancer:
    def __init__(self, model: torch.nn.Module, rate: float, aux_coef: float):
        self.blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        self.rate, self.aux_coef = rate, aux_coef
        for b in self.blocks:
            b.record_stats = True
        self.E = self.blocks[0].num_experts if self.blocks else 0
        self.counts = None

    def after_forward(self, row_ids: torch.Tensor, n_rows: int):
        """Collect this micro-batch's routing. row_ids [T] (row of each token). Returns the summed (over rows and
        layers) sequence aux loss, differentiable, or None when the coefficient is 0."""
        if not self.blocks:
            return None
        dev = self.blocks[0].last_topk_idx.device
        if self.counts is None:
            self.counts = torch.zeros(len(self.blocks), self.E, dtype=torch.int64, device=dev)
        aux = None
        for li, b in enumerate(self.blocks):
            idx = b.last_topk_idx  # [T, k]
            self.counts[li] += torch.bincount(idx.reshape(-1), minlength=self.E)
            if self.aux_coef > 0:
                term = seq_aux_loss(b.last_router_logits, idx, row_ids, n_rows)
                aux = term if aux is None else aux + term
            b.last_router_logits = None  # do not keep the graph alive past this micro-batch
        return None if aux is None else self.aux_coef * aux

    @torch.no_grad()
    def step(self, all_reduce=None) -> dict:
        """End of an optimizer step: global counts, bias update, imbalance stats; resets the counts."""
        if not self.blocks or self.counts is None:
            return {}
        c = self.counts
        if all_reduce is not None:
            all_reduce(c)
        cf = c.double()
        mean = cf.mean(1, keepdim=True)
        ratio = (cf.max(1).values / mean.squeeze(1).clamp_min(1e-9))
        if self.rate > 0:
            delta = (self.rate * torch.sign(mean - cf)).float()
            for li, b in enumerate(self.blocks):
                b.gate.expert_bias.add_(delta[li].to(b.gate.expert_bias.device))
        self.counts = None
        # device scalars: the loop reads them when it logs (no host sync per step)
        return {"moe_imbalance": ratio.mean(), "moe_imbalance_max": ratio.max()}


def seq_aux_loss(logits: torch.Tensor, topk_idx: torch.Tensor, row_ids: torch.Tensor, n_rows: int):
    """logits [T, E] fp32 (differentiable), topk_idx [T, k], row_ids [T] -> sum over rows of sum_e f_e P_e."""
    T, E = logits.shape
    k = topk_idx.shape[1]
    scores = torch.sigmoid(logits.float())
    s_norm = scores / scores.sum(-1, keepdim=True)
    tokens = torch.bincount(row_ids, minlength=n_rows).clamp_min(1).to(s_norm.dtype)  # [R]
    P = torch.zeros(n_rows, E, dtype=s_norm.dtype, device=logits.device).index_add_(0, row_ids, s_norm)
    P = P / tokens[:, None]
    hits = torch.zeros(n_rows, E, dtype=s_norm.dtype, device=logits.device)
    hits.index_put_((row_ids[:, None].expand(T, k).reshape(-1), topk_idx.reshape(-1)),
                    torch.ones(T * k, dtype=s_norm.dtype, device=logits.device), accumulate=True)
    f = hits * (E / (k * tokens[:, None]))
    return (f * P).sum()
