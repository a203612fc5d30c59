"""FSDP2 (`fully_shard`) for the hybrid model.

The routed-expert Parameters are views into the stacked `w13`/`w2` tensors that the fused MoE path reads
(`SparseMoeBlock.stacked`). FSDP2 replaces each Parameter by a sharded DTensor, which would cut those views off
their stacks. So the experts are passed as `ignored_params`: they stay whole and replicated on every rank, and
their gradients are averaged by `ExpertGradSync` (one all-reduce per MoE layer) before the optimizer step.
Everything else (attention, dense MLP, shared experts, router, norms, embeddings, head) is sharded per layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..modules.layers import SparseMoeBlock


def expert_params(model) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, SparseMoeBlock)
            for ex in m.experts for p in ex.parameters()]


def apply_fsdp(model, env):
    if not env.distributed:
        raise ValueError("--fsdp needs several processes (torchrun --nproc-per-node N)")
    if env.device.type != "cuda":
        raise ValueError("--fsdp is supported on CUDA only; on CPU use the default DDP")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cuda", (env.world,))
    ignored = set(expert_params(model))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    model._expert_sync = ExpertGradSync(model, env.world)
    return model


class ExpertGradSync:
    """Average the replicated experts' gradients over ranks (one flat all-reduce per MoE layer)."""

    def __init__(self, model, world: int):
        self.blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        self.world = world

    @torch.no_grad()
    def __call__(self) -> None:
        for b in self.blocks:
            ps = [p for ex in b.experts for p in ex.parameters() if p.grad is not None]
            if not ps:
                continue
            flat = torch.cat([p.grad.reshape(-1) for p in ps])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world
            off = 0
            for p in ps:
                n = p.grad.numel()
                p.grad.copy_(flat[off:off + n].view_as(p.grad))
                off += n
