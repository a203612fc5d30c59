"""Softmax -> hybrid conversion (paper §1.5 / §4): the recipe that made Ring-linear-2.0 from Ling-2.0.

Layers that become linear attention keep every weight, except that their GQA `query_key_value` [(H+2KV)*D, h] is
expanded to MHA [3*H*D, h] by repeating each KV head for the H/KV query heads that used it (query head j reads kv
head j // (H/KV), as in the GQA forward), and they get a fresh `g_proj` [H*D, h] ~ N(0, initializer_range) and
`g_norm` = 1 [H*D]. Softmax layers, MLPs, experts, router biases, embeddings and head are copied unchanged.

The conversion streams tensor by tensor (one source shard open at a time, output shards of at most
`max_shard_bytes`), keeps each tensor's dtype, and writes the result atomically.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..models.checkpoint import ShardWriter, atomic_directory, copy_tokenizer_files, iter_tensors
from ..models.config import RingLinearConfig
_QKV = re.compile(r"^model\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$")


def _source_config(src: str, group_norm_size: int | None) -> RingLinearConfig:
    path = os.path.join(src, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {src}")
    with open(path) as f:
        d = json.load(f)
    mt = str(d.get("model_type", ""))
    if mt == "bailing_moe_linear":
        cfg = RingLinearConfig.from_dict(d)
        if cfg.linear_layers:
            raise ValueError(f"{src} is already a hybrid (layer_group_size {cfg.layer_group_size}); the source must "
                             "have every layer softmax (layer_group_size 1)")
    elif mt.startswith("bailing_moe"):
        # A Ling-2.0 style softmax MoE: same field names and tensor names; the hybrid-only fields are added.
        d = {**d, "model_type": "bailing_moe_linear", "architectures": ["BailingMoeLinearV2ForCausalLM"],
             "layer_group_size": 1, "group_norm_size": d.get("group_norm_size", group_norm_size or 4),
             "linear_silu": False}
        d.pop("auto_map", None)
        cfg = RingLinearConfig.from_dict(d)
    else:
        raise ValueError(f"{src}: model_type {mt!r} is not a softmax checkpoint of this family "
                         "(bailing_moe_linear with layer_group_size 1, or bailing_moe*)")
    if group_norm_size:
        cfg = cfg.replace(group_norm_size=group_norm_size)
    return cfg


def expand_qkv(w: torch.Tensor, H: int, KV: int, D: int) -> torch.Tensor:
    """GQA fused projection [(H+2KV)*D, ...] -> MHA [3*H*D, ...]: each kv head repeated for its H/KV query heads."""
    rest = w.shape[1:]
    q, k, v = w.split([H * D, KV * D, KV * D], dim=0)
    rep = H // KV

    def widen(x):
        return x.reshape(KV, D, *rest).repeat_interleave(rep, dim=0).reshape(H * D, *rest)
    return torch.cat([q, widen(k), widen(v)], dim=0)


def convert_softmax_to_hybrid(src: str, layer_group_size: int, out: str, group_norm_size: int | None = None,
                              seed: int = 0, max_shard_bytes: int = 4 << 30) -> dict:
    src = os.fspath(src)
    cfg = _source_config(src, group_norm_size)
    L, G = cfg.num_hidden_layers, layer_group_size
    if G < 2:
        raise ValueError(f"--layer-group-size must be >= 2 (G-1 linear layers per softmax layer), got {G}")
    # re-validates; MTP blocks are dropped; the layout is the group rule's, whatever the source listed
    new = cfg.replace(layer_group_size=G, num_nextn_predict_layers=0, softmax_layer_indices=None)
    linear = new.linear_layers
    if not linear:
        raise ValueError(f"--layer-group-size {G} with {L} layers leaves no linear layer")
    H, KV, D, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_, cfg.hidden_size
    with atomic_directory(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        expanded, dtype_of = set(), {}
        for st in iter_tensors(src, cfg, desc="converting"):
            t, name = st.load(), st.name
            m = _QKV.match(name)
            if m and int(m.group(1)) in linear:
                if t.shape[0] != (H + 2 * KV) * D:
                    raise ValueError(f"{name}: {tuple(t.shape)} is not a GQA projection of "
                                     f"(H+2KV)*D = {(H + 2 * KV) * D} rows")
                t = expand_qkv(t, H, KV, D)
                expanded.add(int(m.group(1)))
                dtype_of[int(m.group(1))] = t.dtype
            writer.add(name, t)
        missing = sorted(set(linear) - expanded)
        if missing:
            raise ValueError(f"{src} has no attention.query_key_value.weight for layer(s) {missing}")
        for i in linear:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            g = torch.randn(H * D, h, generator=gen) * cfg.initializer_range
            writer.add(f"model.layers.{i}.attention.g_proj.weight", g.to(dtype_of[i]))
            writer.add(f"model.layers.{i}.attention.g_norm.weight", torch.ones(H * D, dtype=dtype_of[i]))
        writer.close()
        new.to_json(os.path.join(tmp, "config.json"))
        copy_tokenizer_files(src, tmp)
    return {"out": os.path.abspath(out), "linear": len(linear), "softmax": L - len(linear),
            "expanded": len(expanded)}
