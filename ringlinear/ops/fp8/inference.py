"""Forward-only FP8 ops over stored FP8 weights (serving: the weights exist only as e4m3 codes + 128x128 block
scales, the layout of `reference.quantize_blocks` and of published FP8 checkpoints; no bf16 copy, no autograd).

Activations are quantised 1x128 on the fly (the RMSNorm in front of a layer writes its FP8 rows in the same pass
and attaches them to its output; a consumer quantises only what it was not handed). Dense GEMMs dispatch as the
training forward does (`autograd._dense_rows`: cuBLAS blockwise scaled_mm on Hopper where the shapes fit, else
our Triton GEMM); the MLPs and routed experts run the grouped FP8 kernels over the fused MoE's routing plan
(gateup -> rows_gemm -> combine). No host sync anywhere, so decode steps capture into CUDA graphs.

Dispatch as the rest of ops/fp8 (`precision.impl`): the Triton kernels on CUDA (or the interpreter with
RINGLINEAR_BACKEND=triton), the exact CPU emulation of `reference.py` on request, otherwise a one-line error.
Outputs are in x's dtype (the model dtype). Shapes: x [T, C]; weights q [.., N, K] e4m3, s [.., N/128, K/128].
"""
from __future__ import annotations

import torch

from . import reference
from .precision import Fp8Recipe, impl, nonfinite_counter
from .reference import E4M3

_ROWS = "_fp8_rows"  # attribute a normed tensor carries: ((q, s), pow2, version or None for inference tensors)


def _recipe(recipe):
    return recipe if recipe is not None else Fp8Recipe.from_env()


def _attach(y, rows, pow2):
    # Inference tensors have no version counter; the decoder never writes its normed tensor in place.
    setattr(y, _ROWS, (rows, pow2, None if y.is_inference() else y._version))


def attached_rows(x, pow2):
    """The FP8 rows (q [T, C], s [C/128, T]) attached to x by `rms_norm`, or None."""
    a = getattr(x, _ROWS, None)
    if a is None or a[1] != pow2 or (a[2] is not None and (x.is_inference() or a[2] != x._version)):
        return None
    return a[0]


def _rows(x, pow2):
    """x [T, C] -> its FP8 rows: attached ones, else one quantising pass."""
    rows = attached_rows(x, pow2)
    if rows is None:
        from .triton_quant import quantize
        rows, _ = quantize(x.contiguous(), E4M3, pow2, nonfinite_counter(x.device), rows=True)
    return rows


def rms_norm(x, weight, eps, recipe=None):
    """RMSNorm (= ops.norm.reference.rms_norm) whose output carries its FP8 rows for the FP8 layers reading it.
    x [T, C] -> [T, C]."""
    r = _recipe(recipe)
    if impl(x, r) == "emulate" or x.dim() != 2:
        from ..norm import rms_norm as plain
        return plain(x, weight, eps)
    from .triton_quant import rms_norm_quant
    y, rows, _, _ = rms_norm_quant(x.contiguous(), weight, eps, r.pow2_scales, nonfinite_counter(x.device))
    _attach(y, rows, r.pow2_scales)
    return y


def linear(x, q, s, bias=None, recipe=None):
    """y = x W^T (+ b) with W stored as (q [N, K], s [N/128, K/128]). x [..., K] -> [..., N]."""
    r = _recipe(recipe)
    lead, K = x.shape[:-1], x.shape[-1]
    if impl(x, r) == "emulate":
        return reference.linear_q(x.reshape(-1, K), q, s, bias, pow2=r.pow2_scales).view(*lead, q.shape[0])
    from . import torch_mm
    from .autograd import _dense_rows
    xq, xs = _rows(x if x.dim() == 2 else x.reshape(-1, K), r.pow2_scales)
    ydt = torch.float32 if bias is not None else x.dtype
    y = _dense_rows(xq, xs, q, s, ydt, "fprop", lambda: torch_mm.fprop(xq, xs, q, s, ydt))
    if bias is not None:
        y = (y + bias.float()).to(x.dtype)
    return y.view(*lead, q.shape[0])


def _grouped(x, rows, w13q, w13s, w2q, w2s, pair, eoff, top_k, pow2):
    """gate/up GEMM (SwiGLU + FP8 rows of h in its epilogue) then the down GEMM: -> o [NK, h] per pair."""
    from . import triton_gemm as G
    _, (hq, hs), _ = G.gateup(*rows, w13q, w13s, pair, eoff, top_k, x.dtype, False, pow2,
                              nonfinite_counter(x.device))
    o = torch.empty(pair.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    return G.rows_gemm(hq, hs, w2q, w2s, pair, eoff, top_k, o, a_gather=False)


def swiglu(x, w13q, w13s, w2q, w2s, recipe=None):
    """Dense SwiGLU MLP (dense layers, the shared expert): w13q [1, 2I, h] (gate rows then up rows), w2q [1, h, I]
    and their block scales. x [T, h] -> [T, h]."""
    r = _recipe(recipe)
    if impl(x, r) == "emulate":
        return reference.swiglu_q(x, w13q, w13s, w2q, w2s, pow2=r.pow2_scales)
    from .triton_gemm import identity_plan
    pair, eoff = identity_plan(x.shape[0], x.device)
    return _grouped(x, _rows(x, r.pow2_scales), w13q, w13s, w2q, w2s, pair, eoff, 1, r.pow2_scales)


def moe_forward(x, router_weight, expert_bias, w13q, w13s, w2q, w2s, shared, *, top_k, n_group, topk_group,
                routed_scaling_factor, norm_topk_prob=True, recipe=None):
    """The MoE block with FP8 routed experts (w13q [E, 2I, h], w2q [E, h, I], scales) and shared expert (`shared`
    = (w13q, w13s, w2q, w2s) of one expert, or None); the router as in ops.moe (fp32 logits from x in its dtype).
    x [N, h] -> (y [N, h], topk_idx [N, k], topk_weight [N, k], router_logits [N, E])."""
    r = _recipe(recipe)
    pow2 = r.pow2_scales
    shared_out = swiglu(x, *shared, recipe=r) if shared is not None else None
    if impl(x, r) == "emulate":
        from ..moe import reference as moe_ref
        idx, wt, logits = moe_ref.route(x, router_weight, expert_bias, top_k, n_group, topk_group,
                                        routed_scaling_factor, norm_topk_prob)
        y = reference.moe_experts_q(x, idx, wt, w13q, w13s, w2q, w2s, pow2=pow2)
        if shared_out is not None:
            y = (y.float() + shared_out.float()).to(x.dtype)
        return y, idx, wt, logits
    from ..moe.triton_gemm import combine
    from ..moe.triton_route import make_plan, router_forward
    idx, wt, logits = router_forward(x, router_weight, expert_bias, top_k, n_group, topk_group,
                                     float(routed_scaling_factor), norm_topk_prob)
    pair, eoff = make_plan(idx, w13q.shape[0])
    o = _grouped(x, _rows(x, pow2), w13q, w13s, w2q, w2s, pair, eoff, top_k, pow2)
    return combine(o, wt.float().contiguous(), shared_out, x.dtype), idx, wt, logits
