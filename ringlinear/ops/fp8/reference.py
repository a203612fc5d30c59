"""FP8 training recipe in plain PyTorch: the spec of the Triton kernels and the CPU emulation path.

Recipe (DeepSeek-V3): float8 e4m3 (max 448) codes with fp32 scales per tile. Activations and gradients are tiled
1x128 (one row, 128 consecutive elements along the reduction dim K of the GEMM that consumes them); weights in
128x128 blocks. A tile's scale is s = amax / fmax (IEEE division), at least FLT_MIN so a zero tile is safe (its
codes are 0 whatever the scale); with `pow2` the scale is rounded up to a power of two, which makes the rescaling
and q * s exact. Codes are q = rne(x * r) with r = 1 / s rounded once per tile (one multiply per element in the
kernels); |x * r| <= fmax (1 + 2^-23) rounds to at most fmax for finite x. GEMMs multiply codes block by block
(K in steps of 128) and add each partial product times a_scale * b_scale into an fp32 accumulator.

Layouts (T tokens or rows, C columns; `ceil` = rounded up):
- rows: q [R, C] fp8, s [ceil(C/128), R] fp32 (tile index outer: cuBLAS's 1x128 scale layout, coalesced per tile)
- cols of x [T, C] (the transposed copy, tiles along T): rows of x^T padded with zeros to whole tiles,
  q [C, Tp], s [Tp/128, C] with Tp = T rounded up to 128 (the weight-gradient GEMM reads whole tiles)
- weight [.., N, K]: q [.., N, K], s [.., N/128, K/128], and its transpose qT [.., K, N], sT [.., K/128, N/128]
- expert-sorted cols (MoE weight gradients): tiles of 128 consecutive sorted rows of one expert, counted over
  the experts in order (`sorted_tiles`); tile slot t holds columns t*128 .. t*128+127 (every tile starts
  16-byte aligned; the tail of a partial tile is padding): q [C, slots*128], s [slots, C]. For one expert
  (a dense layer) this is the cols layout of x [T, C] itself.

Every dimension a GEMM reduces or blocks over in a weight must be a multiple of 128 (`check_dims`); token counts
are free (the last tile along tokens is partial).

The emulated layers below (quantise -> dequantise in fp32 -> fp32 GEMM, rounding where the kernels round) are
what the kernels compute, up to fp32 summation order. Their backward is the straight-through estimator: the
gradient of the unquantised function evaluated with quantised operands (dY 1x128 along N for dgrad, dY^T and
X^T 1x128 along tokens for wgrad).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
TILE = 128
FLT_MIN = 2.0 ** -126
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}


def check_dims(**dims):
    """One-line error for a weight dimension the 128x128 blocks cannot tile."""
    for name, v in dims.items():
        if v % TILE:
            raise ValueError(f"fp8: {name}={v} is not a multiple of {TILE} (the recipe's 128x128 weight blocks); "
                             "run this model in bf16")


def check_fp8_dtype(dtype):
    if dtype not in FP8_MAX:
        raise ValueError(f"fp8: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")


def scale_from_amax(amax, fmax: float, pow2: bool):
    """fp32 tile scales from fp32 tile amax: amax / fmax, at least FLT_MIN, optionally rounded up to 2^e."""
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its rounded reciprocal (amax = 672 gives
    # 1.5000001, not 1.5), which is not the IEEE quotient the kernels compute (H200, 2026-12-01)
    amax = amax.float()
    s = torch.clamp_min(amax / torch.full_like(amax, fmax), FLT_MIN)
    if pow2:
        bits = s.view(torch.int32)
        e = (bits & 0x7F800000) + ((bits & 0x7FFFFF) != 0).to(torch.int32) * 0x800000
        s = e.view(torch.float32)
    return s


def quantize_rows(x, dtype=E4M3, pow2=False):
    """x [R, C] (any float dtype) -> (q [R, C] fp8, s [ceil(C/128), R] fp32): 1x128 tiles along C."""
    check_fp8_dtype(dtype)
    R, C = x.shape
    nkb = -(-C // TILE)
    xf = F.pad(x.float(), (0, nkb * TILE - C)).view(R, nkb, TILE)
    s = scale_from_amax(xf.abs().amax(-1), FP8_MAX[dtype], pow2)             # [R, nkb]
    q = (xf * (torch.ones_like(s) / s)[..., None]).to(dtype).view(R, nkb * TILE)[:, :C]
    return q.contiguous(), s.t().contiguous()


def quantize_cols(x, dtype=E4M3, pow2=False):
    """x [T, C] -> the transposed copy (q [C, Tp], s [Tp/128, C]): 1x128 tiles along T, zero codes past T."""
    T = x.shape[0]
    return quantize_rows(F.pad(x.float(), (0, 0, 0, -(-T // TILE) * TILE - T)).t(), dtype, pow2)


def quantize_blocks(w, pow2=False):
    """w [..., N, K] -> (q [..., N, K] e4m3, s [..., N/128, K/128] fp32): the stored layout of an FP8 checkpoint
    (`weight`, `weight_scale_inv`; w = q * s blockwise)."""
    *lead, N, K = w.shape
    check_dims(weight_rows=N, weight_cols=K)
    wf = w.float().reshape(*lead, N // TILE, TILE, K // TILE, TILE)
    s = scale_from_amax(wf.abs().amax(dim=(-3, -1)), FP8_MAX[E4M3], pow2)     # [..., N/128, K/128]
    q = (wf * (torch.ones_like(s) / s)[..., :, None, :, None]).to(E4M3).reshape(*lead, N, K)
    return q, s


def quantize_weight(w, pow2=False):
    """w [..., N, K] -> (q [..., N, K], s [..., N/128, K/128], qT [..., K, N], sT [..., K/128, N/128]), e4m3."""
    q, s = quantize_blocks(w, pow2)
    return q, s, q.transpose(-1, -2).contiguous(), s.transpose(-1, -2).contiguous()


def dequantize_rows(q, s):
    """(q [R, C], s [ceil(C/128), R]) -> fp32 [R, C]."""
    C = q.shape[1]
    return q.float() * s.t().repeat_interleave(TILE, dim=1)[:, :C]


def dequantize_weight(q, s):
    return q.float() * s.repeat_interleave(TILE, dim=-2).repeat_interleave(TILE, dim=-1)


def fake_rows(x, dtype=E4M3, pow2=False):
    """dequantize_rows(quantize_rows(x)): what a GEMM sees of x [R, C] quantised along C."""
    return dequantize_rows(*quantize_rows(x, dtype, pow2))


def fake_weight(w, pow2=False):
    q, s, _, _ = quantize_weight(w, pow2)
    return dequantize_weight(q, s)


# ---- expert-sorted rows ---------------------------------------------------------------------------------------------

def plan(topk_idx, num_experts):
    """topk_idx [N, k] -> (pair [N*k] int64 sorted by expert, pair order within an expert; eoff [E+1] int64)."""
    flat = topk_idx.reshape(-1)
    pair = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    eoff = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    eoff[1:] = torch.cumsum(counts, 0)
    return pair, eoff


def row_tile_bound(nk, num_experts, block_m=TILE):
    """Slots for expert-sorted row tiles of block_m rows (each expert adds at most one partial tile); the kernels'
    bound."""
    return max(min(nk, -(-nk // block_m) + num_experts), 1)


def sorted_tiles(eoff):
    """[(expert, first row, end row, tile slot)] for 128-row tiles of each expert's sorted rows, experts in order."""
    out, t = [], 0
    eo = eoff.tolist()
    for e in range(len(eo) - 1):
        for r0 in range(eo[e], eo[e + 1], TILE):
            out.append((e, r0, min(r0 + TILE, eo[e + 1]), t))
            t += 1
    return out


def quantize_sorted_cols(rows, eoff, dtype=E4M3, pow2=False):
    """rows [NK, C] (already in expert-sorted order, fp32 values) -> (q [C, slots*128], s [slots, C]): 1x128
    tiles along the sorted rows of one expert, tile t in columns t*128... Padding codes and unused scales are 0."""
    NK, C = rows.shape
    slots = row_tile_bound(NK, eoff.numel() - 1)
    q = torch.zeros(C, slots * TILE, dtype=dtype, device=rows.device)
    s = torch.zeros(slots, C, dtype=torch.float32, device=rows.device)
    for _e, r0, r1, t in sorted_tiles(eoff):
        qt, st = quantize_rows(rows[r0:r1].t(), dtype, pow2)                  # [C, n], [1, C]
        q[:, t * TILE:t * TILE + r1 - r0] = qt
        s[t] = st[0]
    return q, s


def dequantize_sorted_cols(q, s, eoff):
    """-> fp32 [NK, C] (the sorted rows as the weight-gradient GEMM sees them)."""
    out = torch.zeros(int(eoff[-1]), q.shape[0], dtype=torch.float32, device=q.device)
    for _e, r0, r1, t in sorted_tiles(eoff):
        out[r0:r1] = (q[:, t * TILE:t * TILE + r1 - r0].float() * s[t][:, None]).t()
    return out


# ---- emulated FP8 layers (the CPU path with emulate=True, and the spec of the kernels' autograd) --------------------

class _LinearRef(torch.autograd.Function):
    """y = x W^T (+ b): x [T, K] 1x128 along K, W [N, K] 128x128 blocks; fp32 GEMM of the dequantised values."""

    @staticmethod
    def forward(ctx, x, w, bias, gdt, pow2, out_dtype):
        y = fake_rows(x, E4M3, pow2) @ fake_weight(w, pow2).t()
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x, w)
        ctx.gdt, ctx.pow2, ctx.has_bias = gdt, pow2, bias is not None
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        gdt, pow2 = ctx.gdt, ctx.pow2
        dx = (fake_rows(dy, gdt, pow2) @ fake_weight(w, pow2)).to(x.dtype)                 # dgrad: dY 1x128 along N
        dw = (fake_rows(dy.t(), gdt, pow2) @ fake_rows(x.t(), E4M3, pow2).t()).to(w.dtype)  # wgrad: along tokens
        db = dy.float().sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None, None


def linear(x, w, bias=None, *, grad_dtype=E4M3, pow2=False, out_dtype=None):
    """Emulated FP8 linear. x [T, K], w [N, K] -> [T, N] in out_dtype (default x.dtype)."""
    check_dims(in_features=w.shape[1], out_features=w.shape[0])
    check_fp8_dtype(grad_dtype)
    return _LinearRef.apply(x, w, bias, grad_dtype, pow2, out_dtype or x.dtype)


def swiglu32(ab):
    """ab [R, 2I] (gate | up, model dtype) -> silu(gate) * up in fp32, the value the kernels quantise."""
    inter = ab.shape[1] // 2
    g, u = ab[:, :inter].float(), ab[:, inter:].float()
    return g * torch.sigmoid(g) * u


def _per_expert(eoff, fn):
    for e in range(eoff.numel() - 1):
        r0, r1 = int(eoff[e]), int(eoff[e + 1])
        if r1 > r0:
            fn(e, r0, r1)


def experts_forward(x, wt, W13, W2, pair, eoff, top_k, dt, pow2):
    """The experts' forward with the dequantised weights W13 [E, 2I, h], W2 [E, h, I] (fp32): ab = x W13_e^T in
    dt per expert-sorted pair, h = silu(g) u quantised 1x128, o = h W2_e^T in dt, y = sum_s wt * o (fp32, slot
    order; wt None: y = o, one dense MLP). GEMMs through F.linear, so the engine's batch-invariant row blocks
    apply on the CPU. -> (y [N, h] in dt, ab [NK, 2I])."""
    NK, H = pair.numel(), x.shape[1]
    X = fake_rows(x, E4M3, pow2)[pair // top_k]
    ab = torch.empty(NK, W13.shape[1], dtype=dt, device=x.device)
    _per_expert(eoff, lambda e, r0, r1: ab.__setitem__(slice(r0, r1), F.linear(X[r0:r1], W13[e]).to(dt)))
    hd = fake_rows(swiglu32(ab), E4M3, pow2)
    o = torch.empty(NK, H, dtype=dt, device=x.device)
    _per_expert(eoff, lambda e, r0, r1: o.__setitem__(pair[r0:r1], F.linear(hd[r0:r1], W2[e]).to(dt)))
    if wt is None:
        return o, ab
    return (o.view(-1, top_k, H).float() * wt[..., None].float()).sum(1).to(dt), ab


class _ExpertsRef(torch.autograd.Function):
    """SwiGLU experts over expert-sorted (token, slot) rows: ab = x W13_e^T (model dtype), h = silu(g) u (fp32,
    quantised 1x128 along I), o = h W2_e^T (model dtype) per pair, y = sum_s wt * o (fp32, slot order). wt None:
    one dense MLP (rows = tokens, y = o)."""

    @staticmethod
    def forward(ctx, x, wt, w13, w2, pair, eoff, top_k, dt, gdt, pow2):
        y, ab = experts_forward(x, wt, fake_weight(w13, pow2), fake_weight(w2, pow2), pair, eoff, top_k, dt, pow2)
        ctx.save_for_backward(x, wt, w13, w2, pair, eoff, ab)
        ctx.top_k, ctx.gdt, ctx.pow2 = top_k, gdt, pow2
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wt, w13, w2, pair, eoff, ab = ctx.saved_tensors
        k, gdt, pow2 = ctx.top_k, ctx.gdt, ctx.pow2
        NK, H, inter = pair.numel(), x.shape[1], w2.shape[2]
        tok = pair // k
        W13, W2 = fake_weight(w13, pow2), fake_weight(w2, pow2)
        dyd = fake_rows(dy, gdt, pow2)[tok]
        g = torch.empty(NK, inter, dtype=torch.float32, device=x.device)
        _per_expert(eoff, lambda e, r0, r1: g.__setitem__(slice(r0, r1), dyd[r0:r1] @ W2[e]))
        h32 = swiglu32(ab)
        dwt = None
        if wt is not None:
            wsel = wt.reshape(-1).float()[pair]
            dwt = torch.empty(NK, dtype=torch.float32, device=x.device)
            dwt[pair] = (g * h32).sum(1)                                          # d wt = dy . o
            dh = g * wsel[:, None]
        else:
            dh = g
        gg, uu = ab[:, :inter].float(), ab[:, inter:].float()
        sg = torch.sigmoid(gg)
        dab = torch.cat([dh * uu * sg * (1 + gg * (1 - sg)), dh * gg * sg], 1)      # fp32 [NK, 2I]
        dabd = fake_rows(dab, gdt, pow2)
        dxs = torch.empty(NK, H, dtype=ab.dtype, device=x.device)
        _per_expert(eoff, lambda e, r0, r1: dxs.__setitem__(pair[r0:r1], (dabd[r0:r1] @ W13[e]).to(ab.dtype)))
        dx = dxs.to(x.dtype) if wt is None else dxs.view(-1, k, H).float().sum(1).to(x.dtype)
        a2 = dy.float()[tok] * (wsel[:, None] if wt is not None else 1.0)
        a2 = dequantize_sorted_cols(*quantize_sorted_cols(a2, eoff, gdt, pow2), eoff)
        b2 = dequantize_sorted_cols(*quantize_sorted_cols(h32, eoff, E4M3, pow2), eoff)
        a13 = dequantize_sorted_cols(*quantize_sorted_cols(dab, eoff, gdt, pow2), eoff)
        b13 = dequantize_sorted_cols(*quantize_sorted_cols(x.float()[tok], eoff, E4M3, pow2), eoff)
        dw2 = torch.zeros(w2.shape, dtype=torch.float32, device=x.device)
        dw13 = torch.zeros(w13.shape, dtype=torch.float32, device=x.device)

        def wgrads(e, r0, r1):
            dw2[e] = a2[r0:r1].t() @ b2[r0:r1]
            dw13[e] = a13[r0:r1].t() @ b13[r0:r1]

        _per_expert(eoff, wgrads)
        return (dx, dwt.view(-1, k) if dwt is not None else None, dw13.to(w13.dtype), dw2.to(w2.dtype),
                None, None, None, None, None, None)


def moe_experts(x, topk_idx, topk_weight, w13, w2, *, grad_dtype=E4M3, pow2=False, out_dtype=None):
    """Emulated FP8 routed experts, the interface of ops.moe.moe_experts: x [N, h], topk [N, k], w13 [E, 2I, h],
    w2 [E, h, I] -> [N, h] in out_dtype (default x.dtype, the model dtype of its roundings)."""
    check_dims(hidden=w13.shape[2], moe_intermediate=w2.shape[2])
    pair, eoff = plan(topk_idx, w13.shape[0])
    return _ExpertsRef.apply(x, topk_weight.float(), w13, w2, pair, eoff, topk_idx.shape[1], out_dtype or x.dtype,
                             grad_dtype, pow2)


def dense_plan(T, device):
    """The one-expert plan of a dense MLP: (pair = arange(T), eoff = [0, T])."""
    return torch.arange(T, device=device), torch.tensor([0, T], device=device)


def swiglu_mlp(x, w_gate, w_up, w_down, *, grad_dtype=E4M3, pow2=False, out_dtype=None):
    """Emulated FP8 dense SwiGLU MLP (the shared expert, dense layers): x [T, h] -> [T, h]."""
    check_dims(hidden=w_gate.shape[1], intermediate=w_gate.shape[0])
    pair, eoff = dense_plan(x.shape[0], x.device)
    w13 = torch.cat([w_gate, w_up], 0)[None]
    return _ExpertsRef.apply(x, None, w13, w_down[None], pair, eoff, 1, out_dtype or x.dtype, grad_dtype, pow2)


# ---- inference over stored FP8 weights (serving; ops/fp8/inference.py dispatches here on the CPU) ----------------

def linear_q(x, q, s, bias=None, *, pow2=False, out_dtype=None):
    """x [T, K] against a stored FP8 weight (q [N, K], s [N/128, K/128]) -> [T, N] in out_dtype (default x's)."""
    y = F.linear(fake_rows(x, E4M3, pow2), dequantize_weight(q, s))
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def swiglu_q(x, w13q, w13s, w2q, w2s, *, pow2=False, out_dtype=None):
    """Dense SwiGLU MLP over stored FP8 weights (w13q [1, 2I, h] gate rows then up rows, w2q [1, h, I], scales
    [1, ../128, ../128]): x [T, h] -> [T, h]."""
    pair, eoff = dense_plan(x.shape[0], x.device)
    return experts_forward(x, None, dequantize_weight(w13q, w13s), dequantize_weight(w2q, w2s), pair, eoff, 1,
                           out_dtype or x.dtype, pow2)[0]


def moe_experts_q(x, topk_idx, topk_weight, w13q, w13s, w2q, w2s, *, pow2=False, out_dtype=None):
    """Routed experts over stored FP8 weights (w13q [E, 2I, h], w2q [E, h, I]): x [N, h], topk [N, k] -> [N, h]."""
    pair, eoff = plan(topk_idx, w13q.shape[0])
    return experts_forward(x, topk_weight.float(), dequantize_weight(w13q, w13s), dequantize_weight(w2q, w2s), pair,
                           eoff, topk_idx.shape[1], out_dtype or x.dtype, pow2)[0]
