"""FP8 training ops (DeepSeek-V3 recipe: e4m3, 1x128 activation tiles, 128x128 weight blocks, fp32 scales and
accumulation). Dispatch: the Triton kernels where `backend.use_triton` says so (CUDA, or the interpreter with
RINGLINEAR_BACKEND=triton), the exact emulation of `reference.py` only when asked for (`Fp8Recipe(emulate=True)`
or RINGLINEAR_FP8_EMULATE=1), otherwise a one-line error. docs/fp8.md describes the recipe and the switch.

All functions take the recipe explicitly (None = `Fp8Recipe.from_env()`); outputs are in the autocast dtype when
autocast is on (as F.linear's would be), else in x's dtype.
"""
from __future__ import annotations

import torch

from . import reference
from .precision import Fp8Recipe, fp8_active, fp8_disabled, impl, nonfinite_counter, read_nonfinite
from .weights import clear_weight_cache, track_optimizer, weights_updated


def _recipe(recipe):
    return recipe if recipe is not None else Fp8Recipe.from_env()


def _out_dtype(x):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _flat(x):
    """x [..., C] -> (x2 [T, C] contiguous, the leading shape)."""
    return x.reshape(-1, x.shape[-1]).contiguous(), x.shape[:-1]


def _attached(x, r):
    from .autograd import attached
    return attached(x, r)


def fp8_rms_norm(x, weight, eps, recipe=None):
    """RMSNorm (= ops.norm.reference.rms_norm) whose output carries its FP8 rows (and, with grad enabled, the
    transposed copy) for the FP8 linears, MLPs and experts that consume it. x [..., C] -> [..., C]."""
    r = _recipe(recipe)
    if impl(x, r) == "emulate":
        from ..norm.reference import rms_norm
        return rms_norm(x, weight, eps)
    from .autograd import rms_norm_fp8
    x2, lead = _flat(x)
    y = rms_norm_fp8(x2, weight, eps, r)
    if len(lead) == 1:
        return y
    act = y._fp8
    y = y.view(*lead, x.shape[-1])
    y._fp8, act.version = act, y._version
    return y


def fp8_linear(x, weight, bias=None, recipe=None):
    """y = x W^T + b with x 1x128 along K, W 128x128 blocks. x [..., K], weight [N, K] -> [..., N]."""
    r = _recipe(recipe)
    reference.check_dims(in_features=weight.shape[1], out_features=weight.shape[0])
    od = _out_dtype(x)
    x2, lead = _flat(x)
    if impl(x, r) == "emulate":
        y = reference.linear(x2, weight, bias, grad_dtype=r.grad_dtype, pow2=r.pow2_scales, out_dtype=od)
    else:
        from .autograd import linear_fp8
        y = linear_fp8(x2, weight, bias, r, od, act=_attached(x, r))
    return y.view(*lead, weight.shape[0])


def fp8_swiglu(x, w_gate, w_up, w_down, recipe=None):
    """Dense SwiGLU MLP down(silu(gate x) * up x) in FP8 (dense layers, the shared expert). x [..., h]."""
    r = _recipe(recipe)
    reference.check_dims(hidden=w_gate.shape[1], intermediate=w_gate.shape[0])
    od = _out_dtype(x)
    x2, lead = _flat(x)
    if impl(x, r) == "emulate":
        y = reference.swiglu_mlp(x2, w_gate, w_up, w_down, grad_dtype=r.grad_dtype, pow2=r.pow2_scales,
                                 out_dtype=od)
    else:
        from .autograd import swiglu_mlp_fp8
        y = swiglu_mlp_fp8(x2, w_gate, w_up, w_down, r, od, act=_attached(x, r))
    return y.view(*lead, w_down.shape[0])


def fp8_moe_forward(x, router_weight, expert_bias, w13, w2, shared, *, top_k, n_group, topk_group,
                    routed_scaling_factor, norm_topk_prob=True, recipe=None):
    """ops.moe.moe_forward with FP8 experts and shared expert; the router stays as it is (fp32 logits from the
    bf16 inputs). x [N, h] -> (y [N, h], topk_idx, topk_weight, router_logits)."""
    r = _recipe(recipe)
    reference.check_dims(hidden=w13.shape[2], moe_intermediate=w2.shape[2])
    od = _out_dtype(x)
    shared_out = fp8_swiglu(x, *shared, recipe=r) if shared is not None else None
    if impl(x, r) == "emulate":
        from ..moe import reference as moe_ref
        idx, wt, logits = moe_ref.route(x, router_weight, expert_bias, top_k, n_group, topk_group,
                                        routed_scaling_factor, norm_topk_prob)
        y = reference.moe_experts(x, idx, wt, w13, w2, grad_dtype=r.grad_dtype, pow2=r.pow2_scales, out_dtype=od)
        if shared_out is not None:
            y = (y.float() + shared_out.float()).to(od)
        return y, idx, wt, logits
    from ..moe.triton import _RouteFn
    from .autograd import experts_fp8
    idx, wt, logits, pair, eoff = _RouteFn.apply(x, router_weight, expert_bias, top_k, n_group, topk_group,
                                                 float(routed_scaling_factor), norm_topk_prob)
    y = experts_fp8(x, wt, w13, w2, shared_out, pair, eoff, top_k, r, od, act=_attached(x, r))
    return y, idx, wt, logits


def fp8_moe_experts(x, topk_idx, topk_weight, w13, w2, recipe=None):
    """ops.moe.moe_experts in FP8: x [N, h], topk [N, k], w13 [E, 2I, h], w2 [E, h, I] -> [N, h]."""
    r = _recipe(recipe)
    reference.check_dims(hidden=w13.shape[2], moe_intermediate=w2.shape[2])
    od = _out_dtype(x)
    if impl(x, r) == "emulate":
        return reference.moe_experts(x, topk_idx, topk_weight, w13, w2, grad_dtype=r.grad_dtype, pow2=r.pow2_scales,
                                     out_dtype=od)
    from ..moe.triton_route import make_plan
    from .autograd import experts_fp8
    pair, eoff = make_plan(topk_idx, w13.shape[0])
    return experts_fp8(x, topk_weight, w13, w2, None, pair, eoff, topk_idx.shape[1], r, od, act=_attached(x, r))


__all__ = ["Fp8Recipe", "fp8_rms_norm", "fp8_linear", "fp8_swiglu", "fp8_moe_forward", "fp8_moe_experts",
           "fp8_active", "fp8_disabled", "nonfinite_counter", "read_nonfinite", "clear_weight_cache", "track_optimizer",
           "weights_updated", "reference"]
