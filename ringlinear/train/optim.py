"""AdamW with decay only on weight matrices, and the learning-rate schedules (warmup + cosine / WSD / constant).

Parameters in bf16 (the fast training precision on CUDA: every kernel runs on bf16 operands, no per-step casts)
get fp32 master weights in the optimizer state, so updates smaller than a bf16 ulp are not lost: `MasterAdamW`.
"""
from __future__ import annotations

import math

import torch

from ..ops.optim import adamw_step


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (projections, experts, router, lm_head); never norms, biases or the token embedding.

    A tied lm_head shares the embedding Parameter and so is not decayed either (named_parameters yields it once).
    """
    emb = model.model.word_embeddings.weight
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or p is emb else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class MasterAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW semantics; parameters that are not fp32 are updated through an fp32 master copy kept in
    the state (`master`), moments are fp32. One fused pass per tensor on CUDA (ringlinear.ops.optim).

    `step(grad_scale=t)` multiplies every gradient by the 0-d device tensor t first (gradient clipping without a
    host sync)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None, grad_scale=None):
        if closure is not None:
            raise ValueError("MasterAdamW does not take a closure")
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                # FSDP2 shards are DTensors: the update is elementwise, so it runs on the local shard, and the
                # state is kept per local shard (plain tensors; ringlinear.train.fsdp gathers and re-shards it)
                w, g = (_local(p.data), _local(p.grad))
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                    st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
                    if w.dtype != torch.float32:
                        st["master"] = w.detach().float().contiguous()
                st["step"] += 1
                adamw_step(w, g.contiguous(), st.get("master"), st["exp_avg"], st["exp_avg_sq"],
                           lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"],
                           step=st["step"], grad_scale=grad_scale)

    def load_state_dict(self, state_dict):
        # torch's loader casts floating-point state to the parameter's dtype: that would round the fp32 master
        # weights and moments to bf16. Put the fp32 tensors back afterwards.
        saved = {pid: {k: v for k, v in st.items() if torch.is_tensor(v)} for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, tensors in saved.items():
            p = params[pid]
            for k, v in tensors.items():
                self.state[p][k] = v.to(p.device, copy=True)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def make_optimizer(model, lr, weight_decay, betas, eps, device_type: str, per_tensor: bool = False):
    """MasterAdamW for non-fp32 parameters, else torch's AdamW (fused on CUDA; one tensor at a time with
    `per_tensor`, for parameters on several device meshes)."""
    groups = param_groups(model, weight_decay)
    if any(p.dtype != torch.float32 for g in groups for p in g["params"]):
        return MasterAdamW(groups, lr=lr, betas=betas, eps=eps)
    kw = {}
    if per_tensor:
        kw.update(foreach=False, fused=False)
    elif device_type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float, decay_fraction: float) -> float:
    """Multiplier of the peak LR for the update made at 0-based `step`.

    warmup: linear from 1/warmup to 1. cosine: 1 -> min_ratio over the remaining steps. wsd (warmup-stable-decay):
    flat at 1, then linear to min_ratio over the last `decay_fraction` of the run. constant: 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total - warmup, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        n_decay = max(int(round(total * decay_fraction)), 1)
        start = total - n_decay
        if step < start:
            return 1.0
        t = min((step - start + 1) / n_decay, 1.0)
        return 1.0 - (1 - min_ratio) * t
    raise ValueError(f"unknown schedule {schedule!r}")


def make_scheduler(opt, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction))
