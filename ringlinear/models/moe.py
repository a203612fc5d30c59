"""The sigmoid-routed MoE block: router, two stacked expert Parameters, shared expert.

Routed experts are the Parameters w13 [E, 2I, h] (gate rows then up rows) and w2 [E, h, I], which the fused
kernels read directly and whose gradients arrive whole; state_dict / load_state_dict hooks translate them to and
from the checkpoint's per-expert names `experts.{e}.{gate,up,down}_proj.weight` (views, no copies).
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


class SparseMoeBlock(nn.Module):
    """Sigmoid-routed MoE with a shared expert. The routed experts are two stacked Parameters:

    `w13` [E, 2I, h] (each expert's gate rows then up rows) and `w2` [E, h, I]. The fused kernels read them as
    they are and their gradients arrive whole (one tensor per layer for the optimizer, FSDP and expert
    parallelism, instead of 3E small ones). The checkpoint keeps one tensor per expert and projection,
    `experts.{e}.{gate,up,down}_proj.weight`: `state_dict` hands out views of the stacks under those names and
    `load_state_dict` assembles them, so checkpoint IO needs no copies and knows nothing of the stacking.
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
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, h))
        self.w2 = nn.Parameter(torch.empty(E, h, I))
        if cfg.num_shared_experts:
            self.shared_experts = MLP(h, cfg.shared_intermediate_size)
        else:
            self.shared_experts = None
        self.record_stats = False
        # Set by ringlinear.parallel when the routed experts live on several ranks: a callable
        # (block, x) -> (y, topk_idx, router_logits) that routes here and runs the experts over the group.
        self.expert_parallel = None
        self.last_topk_idx = None
        self.last_router_logits = None
        self._register_state_dict_hook(_experts_by_checkpoint_name)
        self._register_load_state_dict_pre_hook(_experts_into_stacks, with_module=True)

    def expert_names(self) -> list[str]:
        """Checkpoint name suffixes of the routed experts, in checkpoint order (gate, up, down per expert)."""
        return [f"experts.{e}.{p}_proj.weight" for e in range(self.num_experts) for p in ("gate", "up", "down")]

    def forward(self, x):  # x [T, h]
        if self.expert_parallel is not None:
            y, idx, logits = self.expert_parallel(self, x)
        else:
            shared = None
            if self.shared_experts is not None:
                s = self.shared_experts
                shared = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
            y, idx, _, logits = moe_forward(x, self.gate.weight, self.gate.expert_bias, self.w13, self.w2, shared,
                                            top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                                            routed_scaling_factor=self.routed_scaling_factor,
                                            norm_topk_prob=self.norm_topk_prob)
        if self.record_stats:
            self.last_topk_idx = idx.detach()
            self.last_router_logits = logits
        return y


def _experts_by_checkpoint_name(module, state_dict, prefix, local_metadata):
    """state_dict hook: `w13` / `w2` out, per-expert views of them (detached or not, as state_dict made them)
    under the checkpoint's names in."""
    w13, w2 = state_dict.pop(prefix + "w13"), state_dict.pop(prefix + "w2")
    I = module.inter
    names = iter(module.expert_names())
    for e in range(module.num_experts):
        for view in (w13[e, :I], w13[e, I:], w2[e]):
            state_dict[prefix + next(names)] = view
    return state_dict


def _experts_into_stacks(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
    """load_state_dict pre-hook: per-expert tensors (checkpoint names) become `w13` / `w2` (a complete set only;
    a partial one is left for load_state_dict to report as missing/unexpected keys)."""
    names = [prefix + n for n in module.expert_names()]
    if not all(n in state_dict for n in names):
        return
    parts = [state_dict.pop(n) for n in names]
    state_dict[prefix + "w13"] = torch.stack([torch.cat(parts[i:i + 2]) for i in range(0, len(parts), 3)])
    state_dict[prefix + "w2"] = torch.stack(parts[2::3])
