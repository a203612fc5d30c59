"""Linear + cross-entropy over the fp32 LM head, plain PyTorch: the spec of the fused op and the CPU path.

logits = x W^T in fp32 (model-dtype inputs, fp32 accumulation, numerics.md), z = logits / temperature,
loss_t = logsumexp(z_t) - z_t[target_t]; targets of -100 are ignored (loss 0, no gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_cross_entropy(x, weight, targets, temperature: float = 1.0, reduction: str = "sum"):
    """x [N, h], weight [V, h], targets [N] int -> fp32 loss: a scalar ("sum", "mean" over kept targets) or [N]
    ("none": -log p(target), 0 where ignored)."""
    logits = F.linear(x.float(), weight.float())
    if temperature != 1.0:
        logits = logits / temperature
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def token_logprobs(logits, targets, temperature: float = 1.0):
    """logits [N, V] fp32, targets [N] -> (log p(target) [N] fp32, logsumexp [N] fp32) of softmax(logits / T)."""
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(1, targets.clamp_min(0).long()[:, None])[:, 0] - lse, lse
