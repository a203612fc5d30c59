"""RingLinearConfig: every field of the published `config.json` (BailingMoeLinearV2Config), round-trippable.

Values come from the checkpoint's config.json; the dataclass defaults are the Ring-mini-linear-2.0 values so that
a preset is a one-liner, but `from_json` never fills a missing *architectural* field silently from a default that
the HF class would disagree with: see `_REQUIRED`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("bailing_moe_linear",)
# The per-layer decay formulas ops/lightning_attn/decay.py implements (named here, not imported: this module stays
# free of torch so that the command line starts fast).
DECAY_FORMULAS = ("hf", "sglang")

# Fields a checkpoint config must carry: their class defaults differ from the published values (model.md §1.2).
_REQUIRED = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "layer_group_size",
    "group_norm_size", "routed_scaling_factor", "rope_theta",
)
# Range checks, so a bad value is named when the config is read rather than failing deep in model construction.
_AT_LEAST_1 = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts", "num_experts_per_tok",
               "n_group", "topk_group", "moe_intermediate_size", "layer_group_size", "group_norm_size")
_AT_LEAST_0 = ("num_shared_experts", "moe_shared_expert_intermediate_size", "first_k_dense_replace",
               "num_nextn_predict_layers")


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
        self._check_types_and_ranges()
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}: ringlinear supports {SUPPORTED_MODEL_TYPES}")
        if self.decay_layer_formula not in DECAY_FORMULAS:
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

    def _check_types_and_ranges(self) -> None:
        for name, allowed in _field_types().items():
            v = getattr(self, name)
            if not any(_is_a(v, t) for t in allowed):
                want = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in allowed)
                raise ValueError(f"config field {name} must be {want}, got {v!r}")
        eos = self.eos_token_id
        if isinstance(eos, list) and not all(_is_a(e, int) for e in eos):
            raise ValueError(f"config field eos_token_id must be an integer or a list of integers, got {eos!r}")
        for name in _AT_LEAST_1 + _AT_LEAST_0:
            v, lo = getattr(self, name), 1 if name in _AT_LEAST_1 else 0
            if v is not None and v < lo:
                raise ValueError(f"config field {name} must be >= {lo}, got {v}")
        for name, ok, rule in (("rms_norm_eps", self.rms_norm_eps > 0, "> 0"),
                               ("rope_theta", self.rope_theta > 0, "> 0"),
                               ("partial_rotary_factor", 0 < self.partial_rotary_factor <= 1, "in (0, 1]"),
                               ("initializer_range", self.initializer_range >= 0, ">= 0"),
                               ("routed_scaling_factor", self.routed_scaling_factor > 0, "> 0")):
            if not ok:
                raise ValueError(f"config field {name} must be {rule}, got {getattr(self, name)}")
        if self.num_experts is not None:
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(f"config field num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                                 f"({self.num_experts})")
            if self.topk_group > self.n_group:
                raise ValueError(f"config field topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")

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

    @property
    def softmax_layers(self) -> list[int]:
        """Indices of the softmax (GQA, KV-cached) layers."""
        return [i for i in range(self.num_hidden_layers) if self.is_softmax_layer(i)]

    @property
    def linear_layers(self) -> list[int]:
        """Indices of the linear-attention (fixed fp32 state) layers."""
        return [i for i in range(self.num_hidden_layers) if not self.is_softmax_layer(i)]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

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
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of fields, got a {type(d).__name__}")
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
            raise FileNotFoundError(f"no config.json at {p}{training_run_hint(os.path.dirname(p))}")
        with open(p) as f:
            try:
                d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{p} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **kw) -> "RingLinearConfig":
        return dataclasses.replace(self, **kw)


def training_run_hint(directory: str) -> str:
    """For an error about a directory that is not a model: where the model is, if it is a training run's output
    (`ringlinear train --out DIR` writes the model to DIR/final)."""
    final = os.path.join(directory, "final")
    return f" (it is a training run; its model is {final})" if os.path.exists(os.path.join(final, "config.json")) \
        else ""


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "an object", type(None): "null"}


def _is_a(v, t) -> bool:
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t)


@functools.lru_cache(maxsize=None)
def _field_types() -> dict[str, tuple]:
    """{field: allowed types} from the annotations (`int | None` -> (int, NoneType))."""
    hints = typing.get_type_hints(RingLinearConfig)
    return {f.name: typing.get_args(hints[f.name]) or (hints[f.name],) for f in dataclasses.fields(RingLinearConfig)
            if f.name != "extra"}
