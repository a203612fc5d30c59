"""Collectives the parallel layers need, on `torch.distributed` (gloo on CPU, nccl on CUDA).

- `all_to_all`: rows of a [R, ...] tensor exchanged by split sizes, differentiable (the backward is the reverse
  exchange). Expert parallelism's dispatch and combine.
- `all_gather_rows`: equal-sized [n, ...] pieces concatenated in rank order, differentiable (the backward sums
  every rank's gradient of the whole and keeps this rank's piece). Context parallelism's states and K/V.
- `all_reduce_fixed`: an inference-only sum whose addition order is fixed for a given world size whatever the
  tensor's size (batch invariance: docs/serving.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        # x [sum(in_splits), ...]: rows in_splits[j] go to rank j; rows out_splits[j] arrive from rank j
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(g.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """x [sum(in_splits), ...] -> [sum(out_splits), ...]; the rows from rank j come j-th, in their order."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [world * m] int64: entry j*m + i goes to rank j. Returns [world * m]: entry j*m + i came from rank j."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def _gather(x, group):
    n = dist.get_world_size(group)
    if dist.get_backend(group) == "nccl":
        out = x.new_empty(n * x.shape[0], *x.shape[1:])
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        return _gather(x, group)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        n, r = ctx.rows, dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == "nccl":
            out = g.new_empty(n, *g.shape[1:])
            dist.reduce_scatter_tensor(out, g, group=ctx.group)
            return out, None
        dist.all_reduce(g, group=ctx.group)  # gloo has no reduce-scatter: sum the whole, keep this rank's rows
        return g[r * n:(r + 1) * n].clone(), None


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """x [n, ...] on every rank -> [world * n, ...] (rank order), differentiable."""
    return _AllGatherRows.apply(x, group)


def all_reduce_fixed(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of `t` over the group, in place, with an addition order that depends only on the world size.

    Two ranks: one addition per element, and a + b == b + a exactly, so the backend's own all-reduce is
    order-free. More ranks: a ring or tree all-reduce adds an element's terms in an order that depends on where
    the element falls in the buffer (so on the batch size); the pieces are gathered and added in rank order
    instead. No host synchronisation either way (CUDA-graph capturable on nccl)."""
    n = dist.get_world_size(group)
    if n == 1:
        return t
    if n == 2:
        dist.all_reduce(t, group=group)
        return t
    parts = _gather(t.reshape(1, *t.shape), group)
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    t.copy_(acc)
    return t
