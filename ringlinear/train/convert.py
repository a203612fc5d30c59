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
import logging
import os
import re
import shutil
import tempfile

import torch

from ..models.checkpoint import _ALIASES, INDEX_NAME, SINGLE_NAME, _is_mtp, _open, _swap_into_place, _weight_files
from ..models.config import RingLinearConfig
from .bpe import copy_tokenizer_files

log = logging.getLogger("ringlinear.train")
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
        if not all(cfg.is_softmax_layer(i) for i in range(cfg.num_hidden_layers)):
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
    # re-validates group_norm_size against H*D; the layout is the group rule's, whatever the source listed
    new = cfg.replace(layer_group_size=G, softmax_layer_indices=None)
    linear = [i for i in range(L) if not new.is_softmax_layer(i)]
    if not linear:
        raise ValueError(f"--layer-group-size {G} with {L} layers leaves no linear layer")
    H, KV, D, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_, cfg.hidden_size
    files = _weight_files(src)
    out = os.path.abspath(os.fspath(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=os.path.dirname(out))
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        expanded, skipped, dtype_of = set(), 0, {}
        by_file: dict[str, list[str]] = {}
        for name, fn in files.items():
            by_file.setdefault(fn, []).append(name)
        for fn in sorted(by_file):
            with _open(os.path.join(src, fn)) as f:
                for name in sorted(by_file[fn]):
                    if _is_mtp(name, L):
                        skipped += 1
                        continue
                    t = f.get_tensor(name)
                    for a, b in _ALIASES.items():
                        name = name.replace(a, b)
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
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if skipped:
        log.info("dropped %d MTP tensor(s)", skipped)
    return {"out": out, "linear": len(linear), "softmax": L - len(linear), "expanded": len(expanded)}


class _ShardWriter:
    """Collects tensors into safetensors shards of at most max_bytes; names them -NNNNN-of-NNNNN at the end."""

    def __init__(self, d: str, max_bytes: int):
        self.d, self.max = d, max_bytes
        self.cur, self.size, self.names, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.cur and self.size + n > self.max:
            self._flush()
        self.cur[name] = t.contiguous()
        self.size += n
        self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file
        fn = f"part-{len(self.names):05d}.safetensors"
        save_file(self.cur, os.path.join(self.d, fn), metadata={"format": "pt"})
        for k in self.cur:
            self.weight_map[k] = fn
        self.names.append(fn)
        self.cur, self.size = {}, 0

    def close(self) -> None:
        if self.cur or not self.names:
            self._flush()
        n = len(self.names)
        if n == 1:
            os.rename(os.path.join(self.d, self.names[0]), os.path.join(self.d, SINGLE_NAME))
            return
        rename = {fn: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, fn in enumerate(self.names)}
        for fn, new in rename.items():
            os.rename(os.path.join(self.d, fn), os.path.join(self.d, new))
        wm = {k: rename[v] for k, v in self.weight_map.items()}
        with open(os.path.join(self.d, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": wm}, f, indent=2, sort_keys=True)
