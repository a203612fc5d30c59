"""FSDP2 (`fully_shard`) for the hybrid model.

The routed-expert Parameters are views into the stacked `w13`/`w2` tensors that the fused MoE path reads
(`SparseMoeBlock.stacked`). FSDP2 replaces each Parameter by a sharded DTensor, which would cut those views off
their stacks. So the experts are passed as `ignored_params`: they stay whole and replicated on every rank, and
their gradients are averaged by `ExpertGradSync` (one all-reduce per MoE layer) before the optimizer step.
Everything else (attention, dense MLP, shared experts, router, norms, embeddings, head) is sharded per layer.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..models.modeling import RingLinearForCausalLM
from ..models.moe import SparseMoeBlock


def expert_params(model) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, SparseMoeBlock)
            for ex in m.experts for p in ex.parameters()]


def apply_fsdp(model, env):
    """Shard in place (each decoder layer, then the root) over all ranks; CUDA (nccl) or CPU (gloo)."""
    if not env.distributed:
        raise ValueError("--fsdp needs several processes (torchrun --nproc-per-node N)")
    # The logits are returned as a view; nothing modifies them in place, so FSDP's warning about that is moot.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    mesh = init_device_mesh(env.device.type, (env.world,))
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


def clip_grads(params, max_norm: float) -> torch.Tensor:
    """Global grad norm over sharded (DTensor) and replicated gradients; scales them in place when max_norm > 0."""
    sq = None
    for p in params:
        n = torch.linalg.vector_norm(p.grad.detach().float())
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        sq = n * n if sq is None else sq + n * n
    total = sq.sqrt()
    if max_norm > 0:
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        for p in params:
            p.grad.detach().mul_(coef)
    return total


def _opts(**kw):
    return StateDictOptions(full_state_dict=True, **kw)


def gathered_model(model, env):
    """A plain CPU copy of the sharded model on rank 0 (None elsewhere), for save_pretrained. Collective."""
    sd = get_model_state_dict(model, options=_opts(cpu_offload=True))
    if not env.is_main:
        return None
    with torch.device("meta"):
        full = RingLinearForCausalLM(model.config)
    full.to_empty(device="cpu")
    missing, unexpected = full.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"gathering the FSDP model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return full


def full_optimizer_state(model, opt) -> dict:
    """Unsharded optimizer state keyed by parameter name (collective; meaningful on rank 0)."""
    return get_optimizer_state_dict(model, opt, options=_opts(cpu_offload=True))


def load_optimizer(model, opt, state: dict) -> None:
    if "optimizer_full" not in state:
        raise ValueError("this checkpoint was written without --fsdp: resume it without --fsdp")
    set_optimizer_state_dict(model, opt, state["optimizer_full"], options=_opts())
