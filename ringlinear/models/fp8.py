"""The FP8 precision switch of RingLinearForCausalLM (docs/fp8.md).

`convert_to_fp8(model, recipe)` turns, in every decoder layer, the dense projections (query_key_value, g_proj,
dense), the dense MLP and, with `recipe.experts`, the shared and routed experts into FP8 layers, and the two RMSNorms that feed
them into RMSNorm -> FP8 producers (their FP8 copies travel with the normed tensor to the FP8 consumers). The
router, the embeddings, the final norm, the LM head and everything inside attention keep their precision.

Conversion swaps module classes in place: parameters, names, state_dict keys, hooks and optimizer references are
untouched, so it can run before or after the optimizer is built, and `.to()` / checkpoint IO behave as before.
`fp8_disabled()` runs a converted model in its original precision for a scope (evaluation, numerics checks).
"""
from __future__ import annotations

from torch import nn

from .layers import MLP, LinearAttention, RMSNorm
from .moe import SparseMoeBlock
from ..ops import fp8 as F8
from ..ops.fp8.reference import check_dims


class Fp8RMSNorm(RMSNorm):
    def forward(self, x):
        if not F8.fp8_active():
            return super().forward(x)
        return F8.fp8_rms_norm(x, self.weight, self.variance_epsilon, self.fp8_recipe)


class Fp8Linear(nn.Linear):
    def forward(self, x):
        if not F8.fp8_active():
            return super().forward(x)
        return F8.fp8_linear(x, self.weight, self.bias, self.fp8_recipe)


class Fp8MLP(MLP):
    def forward(self, x):
        if not F8.fp8_active():
            return super().forward(x)
        return F8.fp8_swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.fp8_recipe)


class Fp8SparseMoeBlock(SparseMoeBlock):
    """The routed and shared experts in FP8; routing (fp32 logits, bias, top-k) as in SparseMoeBlock."""

    def forward(self, x):
        if not F8.fp8_active():
            return super().forward(x)
        w13, w2 = self.w13, self.w2
        s = self.shared_experts
        shared = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight) if s is not None else None
        y, idx, _, logits = F8.fp8_moe_forward(x, self.gate.weight, self.gate.expert_bias, w13, w2, shared,
                                               top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                                               routed_scaling_factor=self.routed_scaling_factor,
                                               norm_topk_prob=self.norm_topk_prob, recipe=self.fp8_recipe)
        if self.record_stats:
            self.last_topk_idx = idx.detach()
            self.last_router_logits = logits
        return y


_SWAPS = ((RMSNorm, Fp8RMSNorm), (nn.Linear, Fp8Linear), (MLP, Fp8MLP), (SparseMoeBlock, Fp8SparseMoeBlock))


def _swap(mod, recipe):
    for base, fp8_cls in _SWAPS:
        if type(mod) in (base, fp8_cls):
            mod.__class__ = fp8_cls
            mod.fp8_recipe = recipe
            return
    raise TypeError(f"convert_to_fp8: no FP8 version of {type(mod).__name__}")


def fp8_modules(layer, experts=True):
    """The modules of one decoder layer that run FP8 (the rest keeps its precision). Without `experts` a MoE
    layer's MLP and the norm feeding it (whose FP8 copies only the MLP would read) stay as they are."""
    att = layer.attention
    mods = [layer.input_layernorm, att.query_key_value, att.dense]
    if experts or not isinstance(layer.mlp, SparseMoeBlock):
        mods += [layer.post_attention_layernorm, layer.mlp]
    if isinstance(att, LinearAttention):
        mods.append(att.g_proj)
    return mods


def _check_layer(i, layer, experts):
    for m in fp8_modules(layer, experts):
        if isinstance(m, nn.Linear):
            check_dims(**{f"layers.{i} in_features": m.in_features, f"layers.{i} out_features": m.out_features})
        elif isinstance(m, MLP):
            check_dims(**{f"layers.{i} intermediate_size": m.gate_proj.out_features})
        elif isinstance(m, SparseMoeBlock):
            check_dims(**{f"layers.{i} moe_intermediate_size": m.inter, f"layers.{i} hidden_size": m.hidden})
            if m.shared_experts is not None:
                check_dims(**{f"layers.{i} shared expert size": m.shared_experts.gate_proj.out_features})


def convert_to_fp8(model, recipe=None, optimizer=None):
    """In place: the FP8 layers of every decoder layer of `model` (RingLinearForCausalLM or RingLinearModel) run
    with `recipe` (default `Fp8Recipe.from_env()`). Checks every dimension first (one-line error, nothing swapped).
    With `optimizer`, FP8 weights are cached between its steps (ops/fp8/weights.py). Calling it again changes the
    recipe."""
    recipe = recipe if recipe is not None else F8.Fp8Recipe.from_env()
    layers = model.model.layers if hasattr(model, "model") else model.layers
    for i, layer in enumerate(layers):
        _check_layer(i, layer, recipe.experts)
    for layer in layers:
        for m in fp8_modules(layer, recipe.experts):
            _swap(m, recipe)
    if optimizer is not None:
        F8.track_optimizer(optimizer)
    return model
