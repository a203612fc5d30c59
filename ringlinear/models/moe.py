"""The sigmoid-routed MoE block and its stacked-expert machinery.

Routed experts are stored stacked, w13 [E, 2I, h] (gate rows then up rows) and w2 [E, h, I], which the fused
kernels read directly; `experts.{e}.{gate,up,down}_proj.weight` are Parameters viewing slices of them, so the
state-dict names equal the checkpoint keys and training gradients land on those Parameters (`_StackGrad`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.moe import moe_forward
from .config import RingLinearConfig
from .layers import MLP


class MoEGate(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # fp32 always (selection only); updated by aux-loss-free balancing in training.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # The bias is learned state kept in fp32: move it, never round it through a lower-precision dtype.
        orig = self.expert_bias
        out = super()._apply(fn, recurse)
        dev = self.expert_bias.device
        if dev.type == "meta":
            pass
        elif orig.device.type == "meta":
            self.expert_bias = torch.zeros(orig.shape, dtype=torch.float32, device=dev)
        else:
            self.expert_bias = orig.to(device=dev, dtype=torch.float32)
        return out


class _StackGrad(torch.autograd.Function):
    """Identity on a stacked tensor whose slices are the given Parameters; backward splits the gradient back.

    stack [E, P*R, C] with params[e*P + j] == stack[e, j*R:(j+1)*R]."""

    @staticmethod
    def forward(ctx, stack, per_expert, *params):
        ctx.per_expert = per_expert
        ctx.shape = stack.shape
        return stack.view(stack.shape)

    @staticmethod
    def backward(ctx, grad):
        E, PR, _ = ctx.shape
        R = PR // ctx.per_expert
        g = grad.reshape(E, ctx.per_expert, R, -1)
        return (None, None, *[g[e, j] for e in range(E) for j in range(ctx.per_expert)])


class SparseMoeBlock(nn.Module):
    """Sigmoid-routed MoE with a shared expert. Experts are stored stacked:

    w13 [E, 2I, h] (gate rows then up rows) and w2 [E, h, I]; `experts.{e}.{gate,up,down}_proj.weight` are
    Parameters viewing slices of them, so state_dict names equal the checkpoint keys and the fused kernels read the
    stacks directly. `_apply` (e.g. .to()) rebuilds the stacks and views.
    """

    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        E, I, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts, self.inter, self.hidden = E, I, h
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.norm_topk_prob = cfg.norm_topk_prob
        if self.topk_group * (E // self.n_group) < self.top_k:
            raise ValueError("topk_group * experts-per-group must be >= num_experts_per_tok")
        self.gate = MoEGate(cfg)
        # experts.{e}.{gate,up,down}_proj.weight: Parameters viewing the stacks (checkpoint names, zero copies)
        self.experts = nn.ModuleList([nn.Module() for _ in range(E)])
        w13 = torch.empty(E, 2 * I, h)
        w2 = torch.empty(E, h, I)
        self._bind(w13, w2, requires_grad=True)
        if cfg.num_shared_experts:
            self.shared_experts = MLP(h, cfg.shared_intermediate_size)
        else:
            self.shared_experts = None
        self.record_stats = False
        self.last_topk_idx = None
        self.last_router_logits = None

    def _bind(self, w13, w2, requires_grad):
        self.w13, self.w2 = w13, w2
        I = self.inter
        for e, ex in enumerate(self.experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                if name not in ex._modules:
                    ex._modules[name] = nn.Module()
            ex.gate_proj._parameters["weight"] = nn.Parameter(w13[e, :I], requires_grad=requires_grad)
            ex.up_proj._parameters["weight"] = nn.Parameter(w13[e, I:], requires_grad=requires_grad)
            ex.down_proj._parameters["weight"] = nn.Parameter(w2[e], requires_grad=requires_grad)

    def _apply(self, fn, recurse=True):
        # Convert the stacks once and re-point every expert Parameter at the new storage.
        rg = self.experts[0].gate_proj.weight.requires_grad
        w13, w2 = fn(self.w13.detach()), fn(self.w2.detach())
        for ex in self.experts:  # keep super()._apply from converting the views one by one
            for name in ("gate_proj", "up_proj", "down_proj"):
                ex._modules[name]._parameters.pop("weight", None)
        out = super()._apply(fn, recurse)
        self._bind(w13, w2, requires_grad=rg)
        return out

    def stacked(self):
        """(w13, w2) for the fused path, zero-copy. With grad enabled they carry autograd edges to every expert
        Parameter (which view them), so training gradients land on the checkpoint-named Parameters."""
        ex0 = self.experts[0]
        if ex0.gate_proj.weight.data_ptr() != self.w13.data_ptr():
            raise RuntimeError("expert Parameters no longer view the stacked MoE weights (replaced outside .to()?)")
        if not (torch.is_grad_enabled() and ex0.gate_proj.weight.requires_grad):
            return self.w13, self.w2
        p13 = [p for ex in self.experts for p in (ex.gate_proj.weight, ex.up_proj.weight)]
        p2 = [ex.down_proj.weight for ex in self.experts]
        return _StackGrad.apply(self.w13, 2, *p13), _StackGrad.apply(self.w2, 1, *p2)

    def forward(self, x):  # x [T, h]
        w13, w2 = self.stacked()
        shared = None
        if self.shared_experts is not None:
            s = self.shared_experts
            shared = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        y, idx, _, logits = moe_forward(x, self.gate.weight, self.gate.expert_bias, w13, w2, shared,
                                        top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                                        routed_scaling_factor=self.routed_scaling_factor,
                                        norm_topk_prob=self.norm_topk_prob)
        if self.record_stats:
            self.last_topk_idx = idx.detach()
            self.last_router_logits = logits
        return y
