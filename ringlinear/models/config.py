"""RingLinearConfig: every field of the published `config.json` (BailingMoeLinearV2Config), round-trippable.

Values come from the checkpoint's config.json; the dataclass defaults are the Ring-mini-linear-2.0 values so that
a preset is a one-liner, but `from_json` never fills a missing *architectural* field silently from a default that
the HF class would disagree with: see `_REQUIRED`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("bailing_moe_linear",)

# Fields a checkpoint config must carry: their class defaults differ from the published values (model.md §1.2).
_REQUIRED = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "layer_group_size",
    "group_norm_size", "routed_scaling_factor", "rope_theta",
)


@dataclass
class RingLinearConfig:
    # --- published config.json fields (names as in the checkpoint) ---
    model_type: str = "bailing_moe_linear"
    architectures: list = field(default_factory=lambda: ["BailingMoeLinearV2ForCausalLM"])
    auto_map: dict | None = field(default_factory=lambda: {
        "AutoConfig": "configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config"})
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    initializer_range: float = 0.02
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 0.5
    use_cache: bool = True
    num_experts: int | None = 256
    num_shared_experts: int | None = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 512
    moe_shared_expert_intermediate_size: int | None = 512
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    routed_scaling_factor: float = 2.5
    router_dtype: str = "fp32"
    moe_router_enable_expert_bias: bool = True
    use_qk_norm: bool = True
    use_rmsnorm: bool = True
    layer_group_size: int = 5
    group_norm_size: int = 4
    linear_silu: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list | None = 156892
    pad_token_id: int | None = 156892
    torch_dtype: str = "bfloat16"
    transformers_version: str | None = "4.56.1"
    # --- ringlinear fields (written back, ignored by other loaders) ---
    # "hf": f(l) = 1 - (l-1)/(L-1) + 1e-5 (official remote code, transformers bailing_hybrid);
    # "sglang": f(l) = 1 - l/(L-1) + 1e-5 (SGLang and vLLM ports). See docs/decay.md.
    decay_layer_formula: str = "hf"
    # None: the HF predicate (`is_softmax_layer`); a list: exactly these layers are softmax, [] = pure linear
    # (layouts the HF rule cannot express, e.g. for `ringlinear sweep`).
    softmax_layer_indices: list | None = None
    # Unknown keys of the source config.json, kept so a round trip loses nothing.
    extra: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ derived
    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}: ringlinear supports {SUPPORTED_MODEL_TYPES}")
        if self.decay_layer_formula not in ("hf", "sglang"):
            raise ValueError(f"decay_layer_formula must be 'hf' or 'sglang', got {self.decay_layer_formula!r}")
        idx = self.softmax_layer_indices
        if idx is not None and (not isinstance(idx, list) or len(set(idx)) != len(idx) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_hidden_layers for i in idx)):
            raise ValueError(f"softmax_layer_indices must be a list of distinct layer indices in "
                             f"[0, {self.num_hidden_layers}), got {idx!r}")
        if self.score_function != "sigmoid":
            raise ValueError(f"unsupported score_function {self.score_function!r} (only 'sigmoid')")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (only 'silu')")
        hd = self.head_dim_
        if (self.num_attention_heads * hd) % self.group_norm_size:
            raise ValueError("num_attention_heads*head_dim must be divisible by group_norm_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts and self.num_experts % self.n_group:
            raise ValueError("num_experts must be divisible by n_group")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dim {self.rotary_dim} must be even")

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim_ * self.partial_rotary_factor)

    def is_softmax_layer(self, i: int) -> bool:
        """HF predicate: every layer_group_size-th layer, plus a tail that does not fill a whole group (unless
        softmax_layer_indices lists the softmax layers explicitly)."""
        if self.softmax_layer_indices is not None:
            return i in self.softmax_layer_indices
        G, L = self.layer_group_size, self.num_hidden_layers
        return (i + 1) % G == 0 or i >= (L // G) * G

    @property
    def layer_types(self) -> list[str]:
        return ["softmax" if self.is_softmax_layer(i) else "linear" for i in range(self.num_hidden_layers)]

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        # HF ignores moe_shared_expert_intermediate_size and uses moe_intermediate_size * num_shared_experts.
        return self.moe_intermediate_size * (self.num_shared_experts or 0)

    @property
    def stop_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([int(e)] if isinstance(e, int) else [int(x) for x in e])

    # ------------------------------------------------------------------ IO
    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = True) -> "RingLinearConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r} in config: ringlinear supports {SUPPORTED_MODEL_TYPES}")
        if strict:
            missing = [k for k in _REQUIRED if k not in d]
            if missing:
                raise ValueError(f"config.json lacks required field(s) {missing}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "RingLinearConfig":
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        if not os.path.exists(p):
            raise FileNotFoundError(f"no config.json at {p}")
        with open(p) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **kw) -> "RingLinearConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------- presets
def _mini() -> RingLinearConfig:
    return RingLinearConfig()


def _flash() -> RingLinearConfig:
    # group_norm_size and rope_theta of the flash checkpoint are not confirmed (model.md §1.1): read config.json.
    return RingLinearConfig(hidden_size=4096, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128, moe_intermediate_size=1024,
                            moe_shared_expert_intermediate_size=1024, layer_group_size=8, group_norm_size=8)


def _tiny() -> RingLinearConfig:
    """For tests: every feature on (dense layer 0, MoE with groups, linear + softmax layers, tail softmax)."""
    return RingLinearConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                            num_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                            moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, layer_group_size=3,
                            group_norm_size=2, max_position_embeddings=4096, rope_theta=10000.0,
                            eos_token_id=[1, 2], pad_token_id=1, bos_token_id=0, torch_dtype="float32")


def _small() -> RingLinearConfig:
    """A few-million-parameter hybrid for demos and training on a laptop (M=3: 3 linear + 1 softmax)."""
    return RingLinearConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8,
                            num_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                            moe_intermediate_size=256, moe_shared_expert_intermediate_size=256, layer_group_size=4,
                            group_norm_size=2, max_position_embeddings=8192, rope_theta=10000.0,
                            eos_token_id=[0], pad_token_id=0, torch_dtype="float32")


PRESETS = {
    "ring-mini-linear-2.0": _mini,
    "ring-flash-linear-2.0": _flash,
    "tiny": _tiny,
    "small": _small,
}


def get_preset(name: str) -> RingLinearConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes for n heads (the lightning-attention decay base); non powers of 2 interleave the 2p list."""
    def pow2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]
    if math.log2(n).is_integer():
        return pow2(n)
    p = 2 ** math.floor(math.log2(n))
    return pow2(p) + alibi_slopes(2 * p)[0::2][: n - p]


def layer_decay_factor(cfg: RingLinearConfig, layer_idx: int) -> float:
    L = cfg.num_hidden_layers
    denom = max(L - 1, 1)
    if cfg.decay_layer_formula == "hf":
        return 1 - (layer_idx - 1) / denom + 1e-5
    return 1 - layer_idx / denom + 1e-5


def layer_log_decay(cfg: RingLinearConfig, layer_idx: int):
    """g_gamma [H] fp32 = -slope_h * f(layer): the per-head log decay of one linear layer."""
    import torch
    # Same arithmetic as the HF buffer: fp32 slopes times a Python-float factor, negated.
    s = torch.tensor(alibi_slopes(cfg.num_attention_heads), dtype=torch.float32, device="cpu")
    return -s * layer_decay_factor(cfg, layer_idx)
