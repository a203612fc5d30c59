"""Building blocks of the Ring-linear-2.0 decoder: norms, rotary tables, both attention kinds, the dense MLP.
Parameter names equal the checkpoint keys (model.md §3); the MoE block is in moe.py."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import norm as norm_ops
from ..ops.lightning_attn.decay import layer_log_decay
from ..ops.moe import swiglu
from ..ops.rope import apply_rope, rope_cos_sin, rope_parameters
from .config import RingLinearConfig


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
        # Fixed decay, not a checkpoint tensor; kept fp32 whatever the model dtype (docs/numerics.md).
        self._g_values = layer_log_decay(cfg.num_attention_heads, layer_idx, cfg.num_hidden_layers,
                                         cfg.decay_layer_formula).tolist()
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
