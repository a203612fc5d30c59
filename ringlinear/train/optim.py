"""AdamW with decay only on weight matrices, and the learning-rate schedules (warmup + cosine / WSD / constant)."""
from __future__ import annotations

import math

import torch


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


def make_optimizer(model, lr, weight_decay, betas, eps, device_type: str):
    kw = {}
    if device_type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kw)


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
