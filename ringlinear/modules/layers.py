"""Building blocks of the Ring-linear-2.0 decoder. Parameter names equal the checkpoint keys (model.md §3)."""
from __future__ import annotations

import torch
from torch import nn

from ..models.config import RingLinearConfig, layer_log_decay
from ..ops import norm as norm_ops
from ..ops.moe import moe_forward, swiglu
from ..ops.rope import rope_cos_sin, rope_parameters


def _fp32_buffer(values: list, like: torch.Tensor) -> torch.Tensor:
    """A constant fp32 buffer rebuilt from exact values on `like`'s device (survives .to(bf16) and meta)."""
    return torch.tensor(values, dtype=torch.float32, device=like.device)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        return norm_ops.rms_norm(x, self.weight, self.variance_epsilon)


class GroupRMSNorm(nn.Module):
    """Weight holder for the linear-attention output norm; applied fused with the sigmoid gate."""

    def __init__(self, size: int, groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_norm_size = groups
        self.variance_epsilon = eps


class RotaryEmbedding(nn.Module):
    """cos/sin tables for partial NeoX RoPE (optionally YaRN), fp32, from integer positions."""

    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_parameters(cfg.rope_theta, cfg.rotary_dim,
                                                           cfg.max_position_embeddings, cfg.rope_scaling)
        self._inv_freq_values = inv_freq.tolist()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.inv_freq = _fp32_buffer(self._inv_freq_values, self.inv_freq)
        return out

    def forward(self, positions):  # [T] -> cos, sin [T, R/2] fp32
        return rope_cos_sin(positions, self.inv_freq.float(), self.attention_scaling)


class _QKVAttention(nn.Module):
    """What both attention kinds share: fused qkv projection (MHA on linear layers, GQA on softmax layers),
    per-head QK RMSNorm, partial NeoX RoPE (fp32, cast once), output projection `dense`."""

    def __init__(self, cfg: RingLinearConfig, layer_idx: int, num_kv_heads: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, num_kv_heads, cfg.head_dim_
        H, KV, D, h = self.num_heads, num_kv_heads, self.head_dim, cfg.hidden_size
        self.query_key_value = nn.Linear(h, (H + 2 * KV) * D, bias=cfg.use_qkv_bias)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(D, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.dense = nn.Linear(H * D, h, bias=cfg.use_bias)
        self.eps = cfg.rms_norm_eps

    def _qkv(self, x, cos, sin, silu: bool = False):
        """x [T, h] -> q [T, H, D], k, v [T, KV, D] (q, k normed and rotated; v contiguous)."""
        T = x.shape[0]
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.query_key_value(x)
        if silu:
            qkv = nn.functional.silu(qkv)
        q, k, v = qkv.view(T, H + 2 * KV, D).split([H, KV, KV], dim=1)
        if self.use_qk_norm:
            q, k = norm_ops.qk_norm_rope(q, k, self.query_layernorm.weight, self.key_layernorm.weight, cos, sin,
                                         self.eps)
        else:
            from ..ops.rope import apply_rope
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            q, k = apply_rope(q.to(acc), cos, sin).to(q.dtype), apply_rope(k.to(acc), cos, sin).to(k.dtype)
        return q, k, v.contiguous()


class LinearAttention(_QKVAttention):
    """Lightning attention layer: MHA qkv, QK-norm, partial RoPE, constant per-head decay, GroupRMSNorm x gate."""

    def __init__(self, cfg: RingLinearConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, num_kv_heads=cfg.num_attention_heads)
        HD, h = self.num_heads * self.head_dim, cfg.hidden_size
        self.g_proj = nn.Linear(h, HD, bias=False)
        self.g_norm = GroupRMSNorm(HD, cfg.group_norm_size, cfg.rms_norm_eps)
        self.linear_silu = cfg.linear_silu
        # Fixed decay, not a checkpoint tensor; kept fp32 whatever the model dtype (numerics.md).
        self._g_values = layer_log_decay(cfg, layer_idx).tolist()
        self.register_buffer("g_gamma", torch.tensor(self._g_values, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.g_gamma = _fp32_buffer(self._g_values, self.g_gamma)
        return out

    def forward(self, x, cos, sin, ctx):  # x [T, h]
        T, HD = x.shape[0], self.num_heads * self.head_dim
        q, k, v = self._qkv(x, cos, sin, silu=self.linear_silu)
        o = ctx.linear_attention(self.layer_idx, q, k, v, self.g_gamma, self.head_dim ** -0.5)  # [T, H, D]
        o = norm_ops.group_rms_norm_gate(o.reshape(T, HD), self.g_norm.weight, self.g_proj(x),
                                         self.g_norm.group_norm_size, self.eps)
        return self.dense(o)


class SoftmaxAttention(_QKVAttention):
    """GQA softmax layer: qkv, QK-norm, partial RoPE, causal attention, dense. No gate, no g_norm."""

    def __init__(self, cfg: RingLinearConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, num_kv_heads=cfg.num_key_value_heads)

    def forward(self, x, cos, sin, ctx):
        q, k, v = self._qkv(x, cos, sin)
        o = ctx.softmax_attention(self.layer_idx, q, k, v, self.head_dim ** -0.5)
        return self.dense(o.reshape(x.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


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
        self.last_topk_idx = None
        self.last_router_logits = None
        self._register_state_dict_hook(_experts_by_checkpoint_name)
        self._register_load_state_dict_pre_hook(_experts_into_stacks, with_module=True)

    def expert_names(self) -> list[str]:
        """Checkpoint name suffixes of the routed experts, in checkpoint order (gate, up, down per expert)."""
        return [f"experts.{e}.{p}_proj.weight" for e in range(self.num_experts) for p in ("gate", "up", "down")]

    def forward(self, x):  # x [T, h]
        w13, w2 = self.w13, self.w2
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
