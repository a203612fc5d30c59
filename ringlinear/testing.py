"""Helpers for the tests (imported by tests only, never by the package): tiny real checkpoints and weight
perturbation."""
from __future__ import annotations

import torch

from .models.demo import make_tiny_checkpoint, train_tiny_tokenizer

__all__ = ["make_tiny_checkpoint", "perturb_norms_and_biases", "train_tiny_tokenizer"]


@torch.no_grad()
def perturb_norms_and_biases(model, seed: int = 0, bias_std: float = 0.05):
    """Give norm weights (1 + 0.1 N) and expert biases (bias_std N) random values, so no term of a test hides
    behind a weight of 1 or a bias of 0. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if hasattr(mod, "expert_bias"):
            mod.expert_bias.copy_(torch.randn(mod.expert_bias.shape, generator=g) * bias_std)
        if hasattr(mod, "variance_epsilon") and hasattr(mod, "weight"):
            mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
    return model
