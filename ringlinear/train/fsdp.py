"""FSDP2 (`fully_shard`) for the hybrid model: every parameter sharded, the routed experts included.

The experts of a layer are two stacked Parameters (`w13` [E, 2I, h], `w2` [E, h, I]), sharded along the expert
dimension like any other weight: at rest each rank holds E/world experts of every layer and their optimizer
state; a layer's forward all-gathers its stacks (contiguous, as the fused MoE kernels read them) and frees them
after. Sharding is per decoder layer, then the root (embeddings, final norm, head).
"""
from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..models.modeling import RingLinearForCausalLM


def apply_fsdp(model, env):
    """Shard in place (each decoder layer, then the root) over all ranks; CUDA (nccl) or CPU (gloo). Parameters
    that already are DTensors (the routed experts under expert parallelism: ringlinear.parallel.expert) keep their
    own mesh and are left to their owner."""
    if not env.distributed:
        raise ValueError("--fsdp needs several processes (torchrun --nproc-per-node N)")
    # The logits are returned as a view; nothing modifies them in place, so FSDP's warning about that is moot.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    mesh = init_device_mesh(env.device.type, (env.world,))

    def placed(module):
        return {p for p in module.parameters() if isinstance(p, DTensor)} or None

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=placed(layer))
    fully_shard(model, mesh=mesh, ignored_params=placed(model))
    # The sharded Parameters by name, taken now: while a module is unsharded (the root after an eval forward),
    # named_parameters() yields its unsharded tensors, not the ones the optimizer holds.
    model._sharded_names = {p: n for n, p in model.named_parameters()}
    return model


def gathered_model(model, env):
    """A plain CPU copy of the sharded model on rank 0 (None elsewhere), for save_pretrained. Collective: every
    rank gathers every parameter in the same order. (Parameters by their attribute names, not through
    torch.distributed.checkpoint's state-dict helpers: those resolve state_dict keys as attributes, and the expert
    stacks are saved under per-expert checkpoint names.)"""
    full = None
    if env.is_main:
        with torch.device("meta"):
            full = RingLinearForCausalLM(model.config)
        full.to(next(model.parameters()).dtype).to_empty(device="cpu")
    dst = dict(full.named_parameters()) if full is not None else {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            if full is not None:
                dst[name].copy_(t)
        if full is not None:
            bufs = dict(full.named_buffers())
            for name, b in model.named_buffers():
                if name in bufs:
                    bufs[name].copy_(b)
    return full


def _param_order(model, opt):
    """(parameter name, Parameter) in the optimizer's order: the same on every rank."""
    names = model._sharded_names
    return [(names[p], p) for g in opt.param_groups for p in g["params"]]


def _full(p, v):
    """An optimizer-state tensor of parameter p, whole. DTensor states (torch's AdamW on sharded parameters) and
    plain local shards (MasterAdamW keeps its fp32 state per local shard) are both gathered."""
    if hasattr(v, "full_tensor"):
        return v.full_tensor()
    if hasattr(p, "to_local") and torch.is_tensor(v) and v.dim() and v.shape == p.to_local().shape:
        return DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
    return v


def full_optimizer_state(model, opt) -> dict:
    """Unsharded optimizer state by parameter name, on CPU: {"state": {name: {key: tensor}}, "groups": [...]}.
    Collective (every rank gathers every tensor in the same order); meaningful on rank 0."""
    state = {}
    for name, p in _param_order(model, opt):
        st = opt.state.get(p, {})
        state[name] = {k: (_full(p, v).cpu() if torch.is_tensor(v) else v) for k, v in sorted(st.items())}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"state": state, "groups": groups}


def load_optimizer(model, opt, state: dict) -> None:
    """Shard a `full_optimizer_state` back onto this rank's parameters (any world size)."""
    if "optimizer_full" not in state:
        raise ValueError("this checkpoint was written without --fsdp: resume it without --fsdp")
    full = state["optimizer_full"]
    local_states = not isinstance(opt, torch.optim.AdamW)  # MasterAdamW: plain tensors of the local shard
    for name, p in _param_order(model, opt):
        st = {}
        for k, v in full["state"].get(name, {}).items():
            if torch.is_tensor(v) and v.dim() and hasattr(p, "device_mesh") and v.shape == p.shape:
                d = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                st[k] = d.to_local() if local_states else d
            elif torch.is_tensor(v):
                st[k] = v.to(p.to_local().device if hasattr(p, "to_local") else p.device)
            else:
                st[k] = v
        if st:
            opt.state[p] = st
    for g, saved in zip(opt.param_groups, full["groups"]):
        g.update(saved)
