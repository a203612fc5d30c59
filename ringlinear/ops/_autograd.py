"""Calling a custom autograd.Function without autograd when no gradient can flow (serving, scoring).

`Function.apply` builds a context object, checks functorch wrappers and links outputs into the graph: 15-35 us of
host time per call on an H200 host, paid ~120 times per prefill step of the Ring-mini shape, which is host-bound
at a few thousand tokens (docs/serving.md, "Host pauses"). Without a tensor that requires grad (or with grad mode
off) the forward runs directly on a stand-in context that drops what it saves; the arithmetic is the same code.
"""
from __future__ import annotations

import torch


class _NoGradCtx:
    """Accepts what a forward records for its backward, and keeps nothing that could matter."""

    def __init__(self, n_inputs: int):
        self.needs_input_grad = (False,) * n_inputs

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def call(fn: type[torch.autograd.Function], *args):
    """fn.apply(*args) when a gradient can flow through a tensor argument, else fn.forward on a stand-in context."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return fn.apply(*args)
    return fn.forward(_NoGradCtx(len(args)), *args)
