"""Tensor and expert parallelism for serving: one model split over the ranks of a group (one process per rank,
every rank running the same step on the same tokens; the driver is ringlinear/engine/distributed.py).

`--tp N` (tensor parallel; the routed experts are then split by expert over the same N ranks):
- attention heads split: rank r keeps query heads [r*H/N, (r+1)*H/N) and the K/V heads they read (GQA: a KV head
  is replicated when N exceeds the KV heads); `query_key_value` and `g_proj` are column-parallel (their rows of
  those heads), the per-head decays and the output norm's channels follow; `dense` is row-parallel (its columns of
  those heads) and sums the ranks' partial outputs. The linear layers' GroupRMSNorm normalises groups of H*D/G
  channels, so N must divide G = group_norm_size (each rank then holds whole groups); other values are refused.
- the dense MLP and the shared expert: gate/up column-parallel, down row-parallel, summed.
- states and KV caches per rank hold only that rank's heads; embeddings, router, final norm and head replicated.
`--ep N` alone: only the routed experts are split (attention and dense layers replicated).

Routed experts (`ServingExperts`): every rank routes all tokens (replicated router), runs the (token, slot) pairs
whose expert it owns through `ringlinear.ops.moe.moe_experts` over its local experts, and writes each pair's
output row into a zero buffer [N, k, h]; one sum over the ranks (each row is non-zero on exactly one rank, so the
sum is exact), then the single-process combine: fp32 weighted sum over slots in slot order. EP alone therefore
computes what one process computes, bit for bit where the expert GEMMs are row-invariant (CPU under batch
invariance; tested). The shared expert's (partial) output rides in the same buffer: one reduction per MoE layer.

Reductions use `all_reduce_fixed` (an addition order fixed by the world size), so batch invariance holds within a
fixed world size. Collectives take no host synchronisation; under CUDA-graph capture the experts take every pair
(non-owned ones masked to zero, fixed shapes) instead of selecting the owned ones (a data-dependent size).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.checkpoint import CheckpointError, iter_tensors, resolve_device, resolve_dtype
from ..models.config import RingLinearConfig
from ..models.layers import MLP, LinearAttention
from ..models.modeling import RingLinearForCausalLM
from ..models.moe import SparseMoeBlock
from ..ops.moe import moe_experts, route, swiglu
from .comm import all_reduce_fixed

_EXPERT = re.compile(r"^(.*\.mlp\.)experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def valid_tp_sizes(cfg: RingLinearConfig, upto: int = 64) -> list[int]:
    return [n for n in range(1, upto + 1) if _tp_problem(cfg, n) is None]


def _tp_problem(cfg: RingLinearConfig, tp: int) -> str | None:
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    if cfg.linear_layers and cfg.group_norm_size % tp:
        return (f"the linear-attention output norm has group_norm_size {cfg.group_norm_size} groups and each rank "
                "must hold whole groups")
    if H % tp:
        return f"the model has {H} attention heads"
    if cfg.softmax_layers and KV % tp and tp % KV:
        return f"the softmax layers' {KV} KV heads must split evenly or replicate evenly"
    for name, size in (("intermediate_size", cfg.intermediate_size), ("shared expert", cfg.shared_intermediate_size)):
        if size % tp:
            return f"the {name} ({size}) must split evenly"
    return None


def check_serving_parallel(cfg: RingLinearConfig, tp: int, ep: int) -> int:
    """The world size of `--tp tp --ep ep` for this model, or a one-line ValueError naming the limit."""
    if tp < 1 or ep < 1:
        raise ValueError(f"--tp and --ep must be >= 1, got --tp {tp} --ep {ep}")
    world = max(tp, ep)
    if tp not in (1, world) or ep not in (1, world):
        raise ValueError(f"--tp {tp} --ep {ep}: both split the same {world} ranks, so they must be equal (or 1)")
    if tp > 1:
        why = _tp_problem(cfg, tp)
        if why is not None:
            ok = ", ".join(map(str, valid_tp_sizes(cfg, max(tp, 8))))
            raise ValueError(f"--tp {tp} does not divide this model: {why} (valid --tp: {ok})")
    if world > 1 and cfg.num_experts and cfg.num_experts % world:
        raise ValueError(f"{world} ranks do not divide the model's {cfg.num_experts} routed experts")
    if ep > 1 and not cfg.num_experts:
        raise ValueError(f"--ep {ep}: this model has no routed experts")
    return world


@dataclass
class Cut:
    """The rank's part of a full tensor: the given [start, stop) ranges along `dim`, concatenated (meta-safe)."""
    dim: int
    ranges: list[tuple[int, int]]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        parts = [t.narrow(self.dim, a, b - a) for a, b in self.ranges]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)).contiguous()


class RowParallelLinear(nn.Linear):
    """A Linear holding some input columns: the ranks' partial products summed, then the bias (once)."""

    def forward(self, x):
        y = all_reduce_fixed(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class TensorParallelMLP(MLP):
    """A SwiGLU MLP holding some intermediate channels: the ranks' partial outputs summed."""

    def forward(self, x):
        return all_reduce_fixed(super().forward(x), self.group)


def _swap(mod, cls, group):
    mod.__class__ = cls
    mod.group = group


def _attention(att, rank: int, tp: int, group) -> dict[str, Cut]:
    H, KV, D = att.num_heads, att.num_kv_heads, att.head_dim
    Hl, rep = H // tp, H // KV
    q0 = rank * Hl
    k0, k1 = q0 // rep, (q0 + Hl - 1) // rep + 1
    qkv = Cut(0, [(q0 * D, (q0 + Hl) * D), ((H + k0) * D, (H + k1) * D), ((H + KV + k0) * D, (H + KV + k1) * D)])
    heads = Cut(0, [(q0 * D, (q0 + Hl) * D)])
    cuts = {"query_key_value.weight": qkv, "dense.weight": Cut(1, heads.ranges)}
    if att.query_key_value.bias is not None:
        cuts["query_key_value.bias"] = qkv
    att.num_heads, att.num_kv_heads = Hl, k1 - k0
    if isinstance(att, LinearAttention):
        cuts.update({"g_proj.weight": heads, "g_norm.weight": heads})
        att.g_norm.group_norm_size //= tp
        att._g_values = att._g_values[q0:q0 + Hl]  # rebuilt into g_gamma by _apply (to_empty, .to)
        att.g_gamma = torch.tensor(att._g_values, dtype=torch.float32, device=att.g_gamma.device)
    _swap(att.dense, RowParallelLinear, group)
    return cuts


def _columns_rows(inter: int, rank: int, tp: int, prefix: str) -> dict[str, Cut]:
    n = inter // tp
    rows = Cut(0, [(rank * n, (rank + 1) * n)])
    return {prefix + "gate_proj.weight": rows, prefix + "up_proj.weight": rows,
            prefix + "down_proj.weight": Cut(1, rows.ranges)}


class ServingExperts:
    """SparseMoeBlock.expert_parallel for serving (identical tokens on every rank). Returns (y, idx, logits)."""

    def __init__(self, rank: int, world: int, num_experts: int, group, shared_split: bool):
        self.rank, self.group, self.shared_split = rank, group, shared_split
        self.local = num_experts // world
        self.lo = rank * self.local

    def __call__(self, block: SparseMoeBlock, x):
        idx, w, logits = route(x, block.gate.weight, block.gate.expert_bias, block.top_k, block.n_group,
                               block.topk_group, block.routed_scaling_factor, block.norm_topk_prob)
        N, k = idx.shape
        h = x.shape[1]
        buf = x.new_zeros(N, k + 1, h)  # this rank's routed rows (zeros elsewhere), then the shared expert's part
        local = (idx - self.lo).reshape(-1)
        own = (local >= 0) & (local < self.local)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():  # fixed shapes: every pair, masked
            ones = torch.ones(N * k, 1, dtype=torch.float32, device=x.device)
            rows = moe_experts(x.repeat_interleave(k, 0), (idx.reshape(-1) % self.local)[:, None], ones,
                               block.w13, block.w2)
            buf[:, :k] = (rows * own[:, None].to(rows.dtype)).view(N, k, h)
        else:
            pairs = own.nonzero().squeeze(1)
            if pairs.numel():
                ones = torch.ones(pairs.numel(), 1, dtype=torch.float32, device=x.device)
                rows = moe_experts(x[pairs // k], local[pairs][:, None], ones, block.w13, block.w2)
                buf.view(N * (k + 1), h)[pairs // k * (k + 1) + pairs % k] = rows
        s = block.shared_experts
        if s is not None and (self.shared_split or self.rank == 0):
            buf[:, k] = swiglu(x, s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        all_reduce_fixed(buf, self.group)
        y = (buf[:, :k].float() * w[..., None].float()).sum(1).to(x.dtype)  # the single-process combine
        return (y if s is None else y + buf[:, k]), idx, logits


def shard_for_serving(model: RingLinearForCausalLM, rank: int, world: int, tp: int, group) -> dict[str, Cut]:
    """In place (meta or real tensors): this rank's part of every split weight, the modules that sum over the
    group swapped in. Returns {parameter name: Cut} (how a full checkpoint tensor becomes this rank's)."""
    cuts: dict[str, Cut] = {}
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        if tp > 1:
            cuts.update({pre + "attention." + k: c for k, c in _attention(layer.attention, rank, tp, group).items()})
            if isinstance(layer.mlp, MLP):
                cuts.update(_columns_rows(layer.mlp.gate_proj.out_features, rank, tp, pre + "mlp."))
                _swap(layer.mlp, TensorParallelMLP, group)
        block = layer.mlp
        if isinstance(block, SparseMoeBlock) and world > 1:
            ex = ServingExperts(rank, world, block.num_experts, group, shared_split=tp > 1)
            cuts[pre + "mlp.w13"] = cuts[pre + "mlp.w2"] = Cut(0, [(ex.lo, ex.lo + ex.local)])
            if tp > 1 and block.shared_experts is not None:
                cuts.update(_columns_rows(block.shared_experts.gate_proj.out_features, rank, tp,
                                          pre + "mlp.shared_experts."))
            block.expert_parallel = ex
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, cut in cuts.items():
            owner, _, attr = name.rpartition(".")
            mod = model.get_submodule(owner)
            setattr(mod, attr, nn.Parameter(cut(params[name].detach()), requires_grad=False))
    for mod in model.modules():  # keep nn.Linear's description in step with the weights
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
    return cuts


def load_sharded(path: str, rank: int, world: int, tp: int, group, dtype=None, device=None) -> RingLinearForCausalLM:
    """This rank's part of checkpoint `path`: built on the meta device, split, allocated once, then every tensor
    read one at a time and cut to this rank (routed experts this rank does not own are never read)."""
    cfg = RingLinearConfig.from_json(path)
    check_serving_parallel(cfg, tp, world)
    with torch.device("meta"):
        model = RingLinearForCausalLM(cfg)
    model.to(resolve_dtype(dtype, cfg))
    cuts = shard_for_serving(model, rank, world, tp, group)
    model.to_empty(device=resolve_device(device or "cpu"))
    target = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    blocks = {f"model.layers.{i}.mlp.": l.mlp for i, l in enumerate(model.model.layers)
              if isinstance(l.mlp, SparseMoeBlock)}
    loaded, unexpected = set(), []
    for t in iter_tensors(path, cfg, desc=f"loading weights (rank {rank})"):
        m = _EXPERT.match(t.name)
        if m and m.group(1) in blocks:
            block, e = blocks[m.group(1)], int(m.group(2))
            lo = block.expert_parallel.lo if block.expert_parallel is not None else 0
            if lo <= e < lo + block.w13.shape[0]:
                I = block.inter
                dst = {"gate": block.w13[e - lo, :I], "up": block.w13[e - lo, I:], "down": block.w2[e - lo]}[m.group(3)]
                _copy(dst, t, t.load())
            loaded.add(t.name)
            continue
        if t.name not in target:
            unexpected.append(t.stored_name)
            continue
        full = t.load()
        _copy(target[t.name], t, cuts[t.name](full) if t.name in cuts else full)
        loaded.add(t.name)
    expected = {n for n in target if not n.endswith((".w13", ".w2"))} | {
        p + n for p, b in blocks.items() for n in b.expert_names()}
    expected -= _nonpersistent(model)
    optional = {k for k in expected if k.endswith("expert_bias")} if not cfg.moe_router_enable_expert_bias else set()
    if cfg.tie_word_embeddings:
        optional.add("lm_head.weight")
    missing = sorted(expected - loaded - optional)
    if unexpected or missing:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s) {unexpected[:3]}, {len(missing)} "
                              f"missing {missing[:3]}")
    model.source_dir = path
    return model.eval()


@torch.no_grad()
def random_sharded(cfg: RingLinearConfig, rank: int, world: int, tp: int, group, dtype=None, device=None,
                   seed: int = 0) -> RingLinearForCausalLM:
    """This rank's part of a random-weight model of shape `cfg` (benchmarks at published shapes, no checkpoint):
    every full tensor drawn on the device in the same order with the same seed on every rank, then cut, so the
    ranks hold pieces of one model (normal(0, initializer_range); norms 1; expert biases normal(0, 1e-3))."""
    check_serving_parallel(cfg, tp, world)
    dev = resolve_device(device or "cpu")
    with torch.device("meta"):
        full_shapes = {n: p.shape for n, p in RingLinearForCausalLM(cfg).named_parameters()}
        model = RingLinearForCausalLM(cfg)
    model.to(resolve_dtype(dtype, cfg))
    cuts = shard_for_serving(model, rank, world, tp, group)
    model.to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        full = torch.randn(full_shapes[name], generator=gen, device=dev, dtype=p.dtype) * cfg.initializer_range
        p.copy_(cuts[name](full) if name in cuts else full)
    for mod in model.modules():
        if hasattr(mod, "expert_bias"):
            mod.expert_bias.normal_(0.0, 1e-3, generator=gen)
    return model.eval()


def _nonpersistent(model) -> set[str]:
    out = set()
    for prefix, mod in model.named_modules():
        for b in mod._non_persistent_buffers_set:
            out.add(f"{prefix}.{b}" if prefix else b)
    return out


def _copy(dst: torch.Tensor, t, src: torch.Tensor) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"tensor {t.stored_name!r} in {t.file}: this rank's part should be "
                              f"{tuple(dst.shape)}, got {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def local_heads(model) -> tuple[int, int]:
    """(linear-attention heads, softmax KV heads) a rank's states and KV cache hold."""
    cfg = model.config
    lin = [l.attention.num_heads for l in model.model.layers if not l.is_softmax]
    soft = [l.attention.num_kv_heads for l in model.model.layers if l.is_softmax]
    return (lin[0] if lin else cfg.num_attention_heads), (soft[0] if soft else cfg.num_key_value_heads)


__all__ = ["check_serving_parallel", "shard_for_serving", "load_sharded", "random_sharded", "local_heads",
           "ServingExperts", "RowParallelLinear", "TensorParallelMLP"]
