"""Expert parallelism for training: the routed experts of every MoE layer split over an EP group of ranks.

World = dp x ep, EP innermost (the ranks of an EP group are consecutive: rank = dp_index * ep + ep_index), so on
one node an EP group shares the fastest links. Each EP rank holds experts [j*E/ep, (j+1)*E/ep) of `w13` / `w2`:
the stacked Parameters become DTensors on the (dp, ep) mesh, placements (Replicate, Shard(0)): sliced on the expert
dimension, so their names and the checkpoint's per-expert names are unchanged, and ringlinear.train.fsdp's gather
and reshard code (full_tensor / distribute_tensor by parameter name) handles them like any other sharded weight.
FSDP2 shards everything else over the whole world and ignores these two.

A layer's forward, per rank (`dispatch_experts`):
1. route its own tokens (the router is replicated): idx [N, k] global expert ids, weights [N, k];
2. sort the N*k (token, slot) pairs by expert (stable: pair order within an expert), exchange the per-expert
   counts with all_to_all, then the token rows (all_to_all with those split sizes): every rank receives, from
   each source rank in rank order, the rows for its experts in expert order;
3. run them through the same expert path a single process uses (`ringlinear.ops.moe.moe_experts`: the reference
   on CPU, the fused grouped GEMMs on CUDA) over the local experts, as one slot per row with weight 1 (which
   returns each row's expert output exactly);
4. send the rows back (the reverse all_to_all), put them in pair order and combine as the single-process path
   does: an fp32 weighted sum over the k slots in slot order, cast once. The result does not depend on the order
   in which rows arrive.
Both exchanges are autograd Functions (parallel/comm.py): the backward runs the reverse exchanges.

Gradients: FSDP2 averages its gradients over the world; an expert's gradient arrives on its owner as the sum over
the EP group's tokens, so `reduce_grads` sums it over the expert's DP replicas and divides by the world size:
both then hold d(loss)/d(weight) of the whole step, as one process on the combined batch would.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ..models.moe import SparseMoeBlock
from ..ops.moe import moe_experts, route
from .comm import all_to_all, exchange_counts


def check_expert_parallel(ep: int, world: int, num_experts: int | None) -> None:
    """One-line errors for an EP size that cannot split this world or these experts."""
    if ep < 1:
        raise ValueError(f"--ep must be >= 1, got {ep}")
    if ep == 1:
        return
    if world % ep:
        raise ValueError(f"--ep {ep} does not divide the {world} processes (world = data-parallel x ep)")
    if not num_experts:
        raise ValueError(f"--ep {ep}: this model has no routed experts")
    if num_experts % ep:
        raise ValueError(f"--ep {ep} does not divide the model's {num_experts} routed experts")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def dispatch_experts(x, topk_idx, topk_weight, w13, w2, group, num_experts: int):
    """Routed experts of this rank's tokens over the EP group. x [N, h]; topk_idx / topk_weight [N, k] (global
    expert ids); w13 [E/ep, 2I, h], w2 [E/ep, h, I]: this rank's experts. Returns [N, h] in x.dtype, differentiable
    with respect to x, topk_weight, w13 and w2. Collective: every rank of `group` calls it per MoE layer; the
    split sizes are read on the host (one synchronisation per layer, as the reference's own per-expert loop)."""
    N, k = topk_idx.shape
    h = x.shape[1]
    ep = dist.get_world_size(group)
    El = num_experts // ep
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)                               # pairs by expert = by owner rank
    counts = torch.bincount(flat, minlength=num_experts)                   # [E] this rank's pairs per expert
    recv = exchange_counts(counts, group)                                  # [ep*El]: from rank j for expert i
    send_splits = counts.view(ep, El).sum(1).tolist()
    recv_splits = recv.view(ep, El).sum(1).tolist()
    xs = all_to_all(x[order // k], recv_splits, send_splits, group)        # [R, h]: by source rank, then expert
    local_ids = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(ep), recv)
    if xs.shape[0]:
        ones = torch.ones(xs.shape[0], 1, dtype=torch.float32, device=x.device)
        ys = moe_experts(xs, local_ids[:, None], ones, w13, w2)            # [R, h]: each row's expert output
    else:  # nothing routed here this step; keep the graph (the reverse exchange still runs)
        ys = xs * 0
    back = all_to_all(ys, send_splits, recv_splits, group)                 # [N*k, h] in `order`
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    rows = back[inverse].view(N, k, h)                                     # pair (token, slot) order
    return (rows.float() * topk_weight[..., None].float()).sum(1).to(x.dtype)


class _RoutedOverGroup:
    """SparseMoeBlock.expert_parallel for training: route locally, experts over the EP group, shared expert
    locally. Returns (y [N, h], topk_idx, router_logits) as the block's own path does."""

    def __init__(self, group, num_experts: int):
        self.group, self.num_experts = group, num_experts

    def __call__(self, block: SparseMoeBlock, x):
        idx, w, logits = route(x, block.gate.weight, block.gate.expert_bias, block.top_k, block.n_group,
                               block.topk_group, block.routed_scaling_factor, block.norm_topk_prob)
        y = dispatch_experts(x, idx, w, _local(block.w13), _local(block.w2), self.group, self.num_experts)
        if block.shared_experts is not None:
            y = y + block.shared_experts(x)
        return y, idx, logits


class ExpertParallel:
    """The (dp, ep) mesh of a training run and what expert parallelism does to the model and its gradients."""

    def __init__(self, ep: int, world: int, device_type: str):
        self.ep, self.dp, self.world = ep, world // ep, world
        self.mesh = init_device_mesh(device_type, (self.dp, ep), mesh_dim_names=("dp", "ep"))
        self.ep_group, self.dp_group = self.mesh.get_group("ep"), self.mesh.get_group("dp")
        self.blocks: list[SparseMoeBlock] = []

    def apply(self, model: nn.Module) -> nn.Module:
        """In place, before FSDP2 and the optimizer: every MoE layer keeps E/ep of its experts (sliced from the
        full stacks, identical on every rank) and dispatches over the EP group."""
        placements = [Replicate(), Shard(0)]
        j = self.mesh.get_local_rank("ep")
        for block in model.modules():
            if not isinstance(block, SparseMoeBlock):
                continue
            El = block.num_experts // self.ep
            for name in ("w13", "w2"):
                full = getattr(block, name).detach()
                if full.is_meta:  # initialised after sharding (benchmarks at full size): shapes only
                    part = DTensor.from_local(full[j * El:(j + 1) * El], self.mesh, placements, run_check=False)
                else:  # rank 0's values everywhere
                    part = distribute_tensor(full, self.mesh, placements)
                setattr(block, name, nn.Parameter(part))
            block.expert_parallel = _RoutedOverGroup(self.ep_group, block.num_experts)
            self.blocks.append(block)
        return model

    def expert_params(self) -> list[nn.Parameter]:
        return [p for b in self.blocks for p in (b.w13, b.w2)]

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """After the step's last backward: each expert's gradient summed over its DP replicas, divided by the
        world (FSDP2's averaging of the other gradients). A layer that got no tokens on a rank gets zeros, so
        every rank joins every reduction."""
        for p in self.expert_params():
            if p.grad is None:
                p.grad = DTensor.from_local(torch.zeros_like(p.to_local()), self.mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
            g = p.grad.to_local()
            if self.dp > 1:
                dist.all_reduce(g, group=self.dp_group)
            g.mul_(1.0 / self.world)
