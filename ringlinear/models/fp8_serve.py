"""FP8 weights for serving (`quantization="fp8"`): the model's matmul weights stored only as e4m3 codes with fp32
scales per 128x128 block, forward only (docs/serving.md, "FP8 weights").

FP8: in every decoder layer `query_key_value`, `g_proj`, `dense`, the dense MLP, the shared expert and the routed
experts; the two RMSNorms in front of them write the FP8 rows of their output in the same pass. In the model dtype:
the router, the embeddings, the final norm, the LM head, every norm and everything inside attention.

Layout = the published FP8 checkpoints' (DeepSeek-V3, the Ling FP8 releases): a weight `W` [N, K] is stored as
`<name>.weight` (float8_e4m3fn [N, K]) and `<name>.weight_scale_inv` (fp32 [N/128, K/128]), W = q * s blockwise
(`ops.fp8.reference.quantize_blocks`); config.json says `quantization_config: {"quant_method": "fp8",
"weight_block_size": [128, 128], ...}`. The MLPs and experts keep stacks `w13` [E, 2I, h] / `w2` [E, h, I] (as the
bf16 MoE does) and their scales; `state_dict` names them per expert and projection, as the checkpoint does.

- `quantize_fp8_(model)`: in place, layer by layer (on the meta device: empty FP8 buffers, what the loader fills).
- `Fp8Loader`: puts one checkpoint tensor at a time into an FP8 model: quantised on the model's device when the
  checkpoint holds it in bf16/fp32, copied when it is FP8, dequantised where the model keeps the model dtype.
  Peak memory: the FP8 model plus one tensor.
- `init_fp8_random_`: random weights drawn in the model dtype one expert chunk at a time and quantised at once
  (benchmarks of shapes whose bf16 weights would not fit).
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch
from torch import nn

from ..ops.fp8 import inference as Q
from ..ops.fp8.precision import Fp8Recipe
from ..ops.fp8.reference import E4M3, TILE, check_dims, dequantize_weight, quantize_blocks
from .layers import MLP, LinearAttention, RMSNorm
from .moe import SparseMoeBlock

log = logging.getLogger("ringlinear")

QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [TILE, TILE]}
QUANTIZATIONS = ("fp8", "none")
SCALE = "_scale_inv"


def check_quantization(q) -> str | None:
    """None (the checkpoint's own), "fp8" or "none"; anything else is a one-line error."""
    if q is None or q in QUANTIZATIONS:
        return q
    raise ValueError(f"quantization {q!r}: supported are {', '.join(QUANTIZATIONS)} (fp8 = blockwise e4m3 weights "
                     "with 128x128 scales)")


def checkpoint_quantization(cfg) -> str:
    """"fp8" when config.json's quantization_config describes the published FP8 layout, "none" without one; any
    other quantization_config is a one-line error (its weights cannot be read as they are meant)."""
    qc = cfg.extra.get("quantization_config")
    if qc is None:
        return "none"
    ok = isinstance(qc, dict) and qc.get("quant_method") == "fp8" and list(qc.get("weight_block_size") or []) == \
        [TILE, TILE] and qc.get("fmt", "e4m3") == "e4m3" and qc.get("activation_scheme", "dynamic") == "dynamic"
    if not ok:
        raise ValueError(f"config.json quantization_config {qc!r} is not supported: ringlinear reads FP8 checkpoints "
                         "with quant_method fp8, e4m3, weight_block_size [128, 128], dynamic activations")
    return "fp8"


def check_fp8_dims(cfg) -> None:
    """One-line error, before any weight is touched, for a dimension the 128x128 blocks cannot tile."""
    H, D = cfg.hidden_size, cfg.head_dim_
    dims = {"hidden_size": H, "query_key_value rows": (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D,
            "attention heads x head_dim": cfg.num_attention_heads * D}
    if cfg.linear_layers:
        dims["linear-layer query_key_value rows"] = 3 * cfg.num_attention_heads * D
    if cfg.first_k_dense_replace or not cfg.num_experts:
        dims["intermediate_size"] = cfg.intermediate_size
    if cfg.num_experts:
        dims["moe_intermediate_size"] = cfg.moe_intermediate_size
        if cfg.num_shared_experts:
            dims["shared expert size"] = cfg.shared_intermediate_size
    check_dims(**dims)


def check_fp8_runtime(device, recipe: Fp8Recipe | None = None) -> None:
    """One-line error when FP8 layers cannot run on `device` (CPU without the emulation asked for, a GPU older
    than sm_89)."""
    from ..ops.fp8.precision import impl
    try:
        impl(torch.empty(0, device=device), recipe if recipe is not None else Fp8Recipe.from_env())
    except RuntimeError as e:
        raise ValueError(str(e)) from None


def _fp8_buffers(module, shapes, device):
    """Register codes + scales buffers {name: [.., N, K]} (empty) on `module`."""
    for name, (*lead, N, K) in shapes.items():
        module.register_buffer(name, torch.empty(*lead, N, K, dtype=E4M3, device=device))
        module.register_buffer(name + SCALE, torch.empty(*lead, N // TILE, K // TILE, dtype=torch.float32,
                                                         device=device))


def _fill(q_dst, s_dst, w):
    """Quantise w [.., N, K] (any float dtype, any device) into the code/scale destinations (views allowed)."""
    q, s = quantize_blocks(w.to(q_dst.device), pow2=False)
    q_dst.copy_(q)
    s_dst.copy_(s)


class _KeepsFp8(nn.Module):
    """Codes and scales keep their dtypes under `.to(dtype)` / `.half()` (they follow device moves only)."""

    def _apply(self, fn, recurse=True):
        fixed = {n: b for n, b in self._buffers.items() if b is not None and b.dtype in (E4M3, torch.float32)}
        out = super()._apply(fn, recurse)
        for n, old in fixed.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        return out


class Fp8InferLinear(_KeepsFp8):
    """y = x W^T (+ b): `weight` e4m3 [N, K], `weight_scale_inv` fp32 [N/128, K/128], `bias` in the model dtype."""

    def __init__(self, lin: nn.Linear, recipe: Fp8Recipe):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.fp8_recipe = recipe
        w = lin.weight
        _fp8_buffers(self, {"weight": tuple(w.shape)}, w.device)
        if w.device.type != "meta":
            with torch.no_grad():
                _fill(self.weight, self.weight_scale_inv, w)
        self.bias = lin.bias

    def forward(self, x):
        return Q.linear(x, self.weight, self.weight_scale_inv, self.bias, self.fp8_recipe)


class Fp8InferNorm(RMSNorm):
    """RMSNorm whose output carries its FP8 rows for the FP8 layers that read it."""

    def forward(self, x):
        return Q.rms_norm(x, self.weight, self.variance_epsilon, self.fp8_recipe)


class _Stacks(_KeepsFp8, ABC):
    """SwiGLU experts as stacks w13 [E, 2I, h] (gate rows then up rows), w2 [E, h, I] + scales; `state_dict`
    names every expert's projections as the checkpoint does (`part_names`), `load_state_dict` takes them."""

    def _init_stacks(self, E, inter, hidden, device, recipe):
        self.num_stacked, self.inter, self.hidden, self.fp8_recipe = E, inter, hidden, recipe
        _fp8_buffers(self, {"w13": (E, 2 * inter, hidden), "w2": (E, hidden, inter)}, device)
        self._register_state_dict_hook(_stacks_to_names)
        self._register_load_state_dict_pre_hook(_names_to_stacks, with_module=True)

    @abstractmethod
    def part_names(self, e: int) -> tuple[str, str, str]:
        """Expert e's (gate, up, down) checkpoint names: each stacked module (MLP, MoE) says."""

    def parts(self):
        """[(checkpoint suffix, stack, expert, row slice)] for codes; scales: suffix + SCALE, rows / 128."""
        I = self.inter
        out = []
        for e in range(self.num_stacked):
            g, u, d = self.part_names(e)
            out += [(g, "w13", e, slice(0, I)), (u, "w13", e, slice(I, 2 * I)), (d, "w2", e, slice(None))]
        return out

    @torch.no_grad()
    def fill_from(self, w13, w2, e0=0):
        """Quantise experts e0.. from w13 [e, 2I, h], w2 [e, h, I] (model dtype) into the stacks."""
        n = w13.shape[0]
        _fill(self.w13[e0:e0 + n], self.w13_scale_inv[e0:e0 + n], w13)
        _fill(self.w2[e0:e0 + n], self.w2_scale_inv[e0:e0 + n], w2)


def _scale_rows(sl):
    return slice(None) if sl.start is None else slice(sl.start // TILE, sl.stop // TILE)


def _stacks_to_names(module, state_dict, prefix, local_metadata):
    stacks = {k: state_dict.pop(prefix + k) for k in ("w13", "w2", "w13" + SCALE, "w2" + SCALE)}
    for name, stack, e, rows in module.parts():
        state_dict[prefix + name] = stacks[stack][e, rows]
        state_dict[prefix + name + SCALE] = stacks[stack + SCALE][e, _scale_rows(rows)]
    return state_dict


def _names_to_stacks(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    parts = module.parts()
    names = [prefix + n + sfx for n, *_ in parts for sfx in ("", SCALE)]
    if not all(n in state_dict for n in names):
        return  # a partial set: load_state_dict reports the missing / unexpected keys
    for sfx in ("", SCALE):
        t = [state_dict.pop(prefix + n + sfx) for n, *_ in parts]
        state_dict[prefix + "w13" + sfx] = torch.stack([torch.cat(t[i:i + 2]) for i in range(0, len(t), 3)])
        state_dict[prefix + "w2" + sfx] = torch.stack(t[2::3])


class Fp8InferMLP(_Stacks):
    """A dense SwiGLU MLP (dense layers, the shared expert) in FP8: the one-expert stack."""

    def __init__(self, mlp: MLP, recipe: Fp8Recipe):
        super().__init__()
        g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        self._init_stacks(1, g.shape[0], g.shape[1], g.device, recipe)
        if g.device.type != "meta":
            self.fill_from(torch.cat([g, u])[None], d[None])

    def part_names(self, e):
        return "gate_proj.weight", "up_proj.weight", "down_proj.weight"

    def forward(self, x):
        return Q.swiglu(x, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv, self.fp8_recipe)


class Fp8InferMoE(_Stacks):
    """SparseMoeBlock with FP8 routed and shared experts; the router (`gate`, bias) and routing unchanged."""

    def __init__(self, moe: SparseMoeBlock, recipe: Fp8Recipe, chunk: int = 16):
        super().__init__()
        for k in ("num_experts", "top_k", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                  "record_stats", "last_topk_idx", "last_router_logits"):
            setattr(self, k, getattr(moe, k))
        self.gate = moe.gate
        self._init_stacks(moe.num_experts, moe.inter, moe.hidden, moe.w13.device, recipe)
        if moe.w13.device.type != "meta":
            for e in range(0, moe.num_experts, chunk):  # temporaries: `chunk` experts in fp32 at a time
                self.fill_from(moe.w13[e:e + chunk], moe.w2[e:e + chunk], e)
        s = moe.shared_experts
        self.shared_experts = Fp8InferMLP(s, recipe) if s is not None else None

    def part_names(self, e):
        return tuple(f"experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down"))

    def forward(self, x):  # x [T, h]
        s = self.shared_experts
        shared = (s.w13, s.w13_scale_inv, s.w2, s.w2_scale_inv) if s is not None else None
        y, idx, _, logits = Q.moe_forward(x, self.gate.weight, self.gate.expert_bias, self.w13, self.w13_scale_inv,
                                          self.w2, self.w2_scale_inv, shared, top_k=self.top_k, n_group=self.n_group,
                                          topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                                          norm_topk_prob=self.norm_topk_prob, recipe=self.fp8_recipe)
        if self.record_stats:
            self.last_topk_idx = idx.detach()
            self.last_router_logits = logits
        return y


def is_fp8(model) -> bool:
    return getattr(model, "quantization", None) == "fp8"


@torch.no_grad()
def quantize_fp8_(model, recipe: Fp8Recipe | None = None):
    """In place: every decoder layer's FP8 modules replaced by their FP8 versions, one module at a time (the bf16
    weights of a module are freed once its codes exist, unless the caller holds them). Dimensions are checked first
    (one-line error, nothing changed). On the meta device the FP8 buffers are empty (`Fp8Loader` fills them)."""
    if is_fp8(model):
        return model
    recipe = recipe if recipe is not None else Fp8Recipe.from_env()
    check_fp8_dims(model.config)
    for layer in model.model.layers:
        att = layer.attention
        att.query_key_value = Fp8InferLinear(att.query_key_value, recipe)
        att.dense = Fp8InferLinear(att.dense, recipe)
        if isinstance(att, LinearAttention):
            att.g_proj = Fp8InferLinear(att.g_proj, recipe)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.__class__ = Fp8InferNorm
            norm.fp8_recipe = recipe
        layer.mlp = (Fp8InferMoE if isinstance(layer.mlp, SparseMoeBlock) else Fp8InferMLP)(layer.mlp, recipe)
    model.quantization = "fp8"
    model.config = model.model.config = model.config.replace(
        extra={**model.config.extra, "quantization_config": dict(QUANT_CONFIG)})
    return model


def fp8_buffer_names(model) -> set[str]:
    """state_dict names of the FP8 codes (each has a `<name>_scale_inv` beside it)."""
    return {k for k, v in model.state_dict().items() if v.dtype == E4M3}


class Fp8Loader:
    """Checkpoint tensors into a model, one at a time, FP8 on either side.

    `target` = model.state_dict(keep_vars=True) (views into the stacks included). `put(t)` (a checkpoint.StoredTensor)
    returns the target names it filled: a weight the model keeps in FP8 but the checkpoint holds in bf16/fp32 is
    quantised on the model's device (its scale filled too); FP8 codes and scales for FP8 destinations are copied; an
    FP8 weight whose destination is in the model dtype is dequantised once both its codes and its scale are read.
    `finish()` raises for codes or scales that never met their partner."""

    def __init__(self, target: dict):
        self.target = target
        self.codes: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def accepts(self, name: str) -> bool:
        return name in self.target or (name.endswith(SCALE) and name[:-len(SCALE)] in self.target)

    @staticmethod
    def _check_shape(t, want):
        if tuple(t.shape) != tuple(want):
            from .checkpoint import CheckpointError
            raise CheckpointError(f"tensor {t.stored_name!r} in {t.file}: expected shape {tuple(want)}, found "
                                  f"{tuple(t.shape)}")

    def _dequantize(self, base):
        if base not in self.codes or base not in self.scales:
            return []
        dst = self.target[base]
        dst.copy_(dequantize_weight(self.codes.pop(base).to(dst.device), self.scales.pop(base).float().to(dst.device)))
        return [base]

    @torch.no_grad()
    def put(self, t) -> list[str]:
        name = t.name
        if name not in self.target:                      # the scale of a weight the model keeps in its dtype
            base = name[:-len(SCALE)]
            d = self.target[base]
            self._check_shape(t, (d.shape[0] // TILE, d.shape[1] // TILE))
            self.scales[base] = t.load()
            return self._dequantize(base)
        dst = self.target[name]
        self._check_shape(t, dst.shape)
        w = t.load()
        if w.dtype != E4M3 and w.dtype.itemsize == 1 and w.is_floating_point():
            from .checkpoint import CheckpointError
            raise CheckpointError(f"tensor {t.stored_name!r} in {t.file} is {w.dtype}: FP8 checkpoints hold "
                                  "float8_e4m3fn codes")
        if dst.dtype == E4M3 and w.dtype != E4M3:        # quantise at load
            _fill(dst, self.target[name + SCALE], w)
            return [name, name + SCALE]
        if dst.dtype != E4M3 and w.dtype == E4M3:        # dequantise once the scale is here too
            self.codes[name] = w
            return self._dequantize(name)
        dst.copy_(w)                                     # codes, scales, or model-dtype tensors
        return [name]

    def finish(self, where: str) -> None:
        left = sorted(set(self.codes) | set(self.scales))
        if left:
            from .checkpoint import CheckpointError
            raise CheckpointError(f"{where}: FP8 weight(s) with codes but no {SCALE[1:]} (or the reverse): {left[:3]} "
                                  f"({len(left)} total)")


@torch.no_grad()
def init_fp8_random_(model, seed: int = 0, chunk: int = 8):
    """Random weights for an FP8 model allocated on its device (e.g. by `to_empty`): every FP8 weight drawn as
    N(0, initializer_range) in the model dtype and quantised at once (experts `chunk` at a time, so the model-dtype
    temporaries stay small); norms 1, other tensors N(0, std), expert bias 0. For benchmarks: the bf16 model never
    exists."""
    dev = model.lm_head.weight.device
    dt = model.lm_head.weight.dtype
    std = model.config.initializer_range
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dt, device=dev) * std

    for mod in model.modules():
        if isinstance(mod, Fp8InferLinear):
            _fill(mod.weight, mod.weight_scale_inv, randn(*mod.weight.shape))
        elif isinstance(mod, _Stacks):
            for e in range(0, mod.num_stacked, chunk):
                n = min(chunk, mod.num_stacked - e)
                mod.fill_from(randn(n, *mod.w13.shape[1:]), randn(n, *mod.w2.shape[1:]), e)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(randn(*p.shape))
    for mod in model.modules():
        if hasattr(mod, "expert_bias"):
            mod.expert_bias.zero_()
    return model


def weight_bytes(model) -> dict:
    """Bytes of the model's tensors: FP8 codes, their scales, everything else (model dtype / fp32)."""
    out = {"fp8_codes": 0, "fp8_scales": 0, "other": 0}
    codes = fp8_buffer_names(model) if is_fp8(model) else set()
    seen = set()
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.numel()) if v.device.type != "meta" else k
        if key in seen:  # tied embeddings
            continue
        seen.add(key)
        n = v.numel() * v.element_size()
        if k in codes:
            out["fp8_codes"] += n
        elif k.endswith(SCALE) and k[:-len(SCALE)] in codes:
            out["fp8_scales"] += n
        else:
            out["other"] += n
    out["total"] = sum(out.values())
    return out
