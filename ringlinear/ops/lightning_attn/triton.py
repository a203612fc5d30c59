"""Lightning attention on Triton: training (autograd), serving prefill from state slots, and decode.

Same functions and signatures as `reference.py` (see its docstring for the maths and layouts); kernels are in
`triton_kernels.py`. Nothing on the hot path reads a device value on the host: the segment table for long
sequences is built with device ops from `cu_seqlens`, sized from shapes alone.
"""
from __future__ import annotations

import torch

from . import triton_kernels as kern
from .._triton import num_sms, patch_interpreter

patch_interpreter()

# Segments start on multiples of this, so every chunk size the kernels use (16, 32, 64) tiles them. The
# `chunk_size` argument of the reference is accepted and ignored: chunking is internal here.
SEG_ALIGN = 64


# Overrides for tuning and tests (the benchmark sweeps these; tests force the split path). Keys: "programs"
# (program count a split aims for), "segment" (force splitting at this length), "unsplit" (never split: whole
# sequences even in training, for comparing against the split), "fwd" (BT, BV, warps, stages),
# "bwd" (BT, (BK, warps) dq, (BK, warps) dk, (BV, warps) dv, stages), "decode" (BV, warps), "prec32". Empty in
# normal use.
TUNE: dict = {}


def _sms(device: torch.device) -> int:
    return num_sms(device) or 4  # interpreter: small, so CPU tests also exercise the split path


def _prec(dtype: torch.dtype) -> tuple[str, bool]:
    """(PREC for fp32 dots, LOWP). 16-bit inputs run 16-bit tensor-core dots (LOWP); fp32 inputs need
    fp32-accurate dots: plain tf32 would cost ~1e-3 relative error. tf32x3 (three tf32 products) keeps the
    tensor cores and ~1e-6 error; ieee (FMA) needs far more registers at these tile sizes."""
    if dtype == torch.float32:
        return TUNE.get("prec32", "tf32x3"), False
    return "tf32", True


def aligned_config(K: int, V: int, dtype: torch.dtype):
    """(BT, BV, warps, stages) of numerics="aligned": training, prefill and decode must all use it."""
    return _fwd_configs(K, V, dtype)[0]


def _fwd_configs(K: int, V: int, dtype: torch.dtype):
    """(wide, narrow) forward configs (BT, BV, warps, stages). Wide blocks re-read q, k less and won on an H100
    (T=4K: 0.47 ms vs 0.67 ms); narrow ones double the programs when there are too few (T=16K, B=4: 0.52 ms
    unsplit vs 0.77 ms split). Register fit checked with ptxas -v (spills <= 68 bytes)."""
    if dtype == torch.float32:
        c = (16, min(V, 32), 8, 2)
        return c, c
    if K >= 256:
        c = (64, 32, 4, 2)
        return c, c
    return (64, min(V, 64), 4, 2), (64, min(V, 32), 4, 3)


def _bwd_blocks(K: int, V: int, dtype: torch.dtype):
    """(BT, (BK, warps) dq, (BK, warps) dk, (BV, warps) dv, stages). Each backward kernel splits the dimension
    along which its carried state separates exactly, so no partial sums cross programs."""
    if "bwd" in TUNE:
        return TUNE["bwd"]
    if dtype == torch.float32:
        return 16, (min(K, 32), 8), (min(K, 32), 8), (min(V, 32), 8), 2
    if K >= 256:
        return 32, (32, 8), (32, 8), (32, 8), 2
    # H200, T=4K, backward alone: 1.29 ms with 64-wide blocks vs 2.02 ms with 32 (half the re-read and
    # re-computed shared tiles; ptxas reports <= 56 bytes of spills).
    return 64, (min(K, 64), 4), (min(K, 64), 4), (min(V, 64), 4), 2


class _Plan:
    """How the tokens are cut into segments, and the forward launch config.

    Whole sequences (split=False) when there are enough (sequence, head, value block) programs to fill the GPU;
    otherwise segments of L tokens (a device table built from cu_seqlens without reading it on the host), sized
    so that about 4 programs per SM exist (at most 4 for equal-length batches). With cu_seqlens on the CPU the
    lengths are known for free, and a packed batch whose longest sequence dwarfs the rest is split too;
    `segmented` asks for segments always."""

    def __init__(self, B, T, H, K, V, cu_seqlens, device, dtype, training=False, aligned=False, segmented=False):
        self.varlen = cu_seqlens is not None
        self.N = cu_seqlens.numel() - 1 if self.varlen else B
        self.Ttot = B * T
        self.T = T
        sms = _sms(device)
        wide, narrow = _fwd_configs(K, V, dtype)
        longest, outlier = T, False
        if self.varlen:
            longest = self.Ttot
            if cu_seqlens.device.type == "cpu" and self.N > 0:
                longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
                outlier = longest >= 8 * max(1, self.Ttot // self.N) and longest >= 8192
        self.fwd = wide
        split = False
        if self.N * H * (V // wide[1]) >= 2 * sms:
            pass
        elif self.N * H * (V // narrow[1]) >= sms:
            self.fwd = narrow
        else:
            split = True
        # Training: the backward kernels have (K / BK) programs per (sequence, head). At T=16K, B=4 that is 128
        # for 132 SMs; split then, as at T=64K (H200: fwd+bwd 26.8 Mtok/s unsplit at 16K, 28.8 split at 64K).
        bk = _bwd_blocks(K, V, dtype)[1][0]
        if training and self.N * H * (K // bk) < 2 * sms:
            split, self.fwd = True, wide
        split = (split or outlier or segmented) and not TUNE.get("unsplit")
        self.fwd = TUNE.get("fwd", self.fwd)
        # Aligned: one arithmetic for every call: whole sequences, one fixed config, and no fused multiply-adds
        # (the compiler contracts a*b+c into an fma or not depending on the surrounding code, which differs
        # between the forward, its aligned-prefill variant and the decode kernel; see aligned.py).
        self.launch = {"enable_fp_fusion": False} if aligned else {}
        if aligned:
            split, self.fwd = False, aligned_config(K, V, dtype)
        self.split = False
        self.L = max(self.Ttot, 1)
        nv = V // self.fwd[1]
        target = TUNE.get("programs", 4 * sms)
        if "segment" in TUNE and not aligned:
            self.split, self.L = True, -(-int(TUNE["segment"]) // SEG_ALIGN) * SEG_ALIGN
        elif split and not aligned:
            if self.varlen:
                L = max(-(-self.Ttot * H * nv // target), 4 * SEG_ALIGN)
            else:
                # Equal segments, and at most `target` programs: rounding the segment count up overshoots into
                # a third, nearly empty wave (H200, T=16K, B=4, fwd+bwd: 2.53 ms with 5 x 3328-token segments,
                # 2.36 with 4 x 4096, 2.25 with 2 x 8192).
                nseg = max(1, target // (self.N * H * nv))
                L = max(-(-T // nseg), 4 * SEG_ALIGN)
            L = -(-L // SEG_ALIGN) * SEG_ALIGN
            if L < longest:
                self.split, self.L = True, L
        if self.varlen:
            self.cu = cu_seqlens.to(device=device, dtype=torch.int32)
        elif self.split:
            self.cu = torch.arange(0, (B + 1) * T, T, device=device, dtype=torch.int32)
        else:
            self.cu = None
        if self.split:
            self.max_seg = self.Ttot // self.L + self.N
            lens = self.cu[1:] - self.cu[:-1]
            nseg = torch.clamp((lens + (self.L - 1)) // self.L, min=1)
            self.seg_ptr = torch.zeros(self.N + 1, device=device, dtype=torch.int32)
            self.seg_ptr[1:] = torch.cumsum(nseg, 0)
            s = torch.arange(self.max_seg, device=device, dtype=torch.int32)
            seq = torch.searchsorted(self.seg_ptr[1:], s, right=True).to(torch.int32)
            self.seg_seq = torch.where(seq < self.N, seq, -1).to(torch.int32)
            self.n_seg = self.max_seg
        else:
            self.seg_ptr = self.seg_seq = None
            self.n_seg = self.N

    def args(self):
        return self.cu, self.seg_seq, self.seg_ptr


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, T, H, D] -> (tensor, token stride) with heads/dims contiguous and B, T mergeable; copies otherwise."""
    B, T, H, D = x.shape
    if x.stride(3) != 1 or x.stride(2) != D or (B > 1 and x.stride(0) != T * x.stride(1)):
        x = x.contiguous()
    return x, (x.stride(1) if T > 1 else H * D)


def _check(q, k, v, g_gamma):
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be [B, T, H, D] with equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"the Triton kernels take bf16/fp16/fp32 inputs, got {q.dtype} (fp64: use the reference)")
    D, Dv, H = q.shape[-1], v.shape[-1], q.shape[2]
    for d in (D, Dv):
        if d not in (16, 32, 64, 128, 256):
            raise ValueError(f"head dims must be one of 16, 32, 64, 128, 256 for the Triton kernels, got {d} "
                             "(RINGLINEAR_BACKEND=torch runs the reference ops instead)")
    if g_gamma.shape != (H,):
        raise ValueError(f"g_gamma must be [H]={H}, got {tuple(g_gamma.shape)}")


def _states(x, N, H, K, V, what):
    if x is None:
        return None
    if x.shape != (N, H, K, V) or x.dtype != torch.float32:
        raise ValueError(f"{what} must be fp32 [N, H, K, V]={(N, H, K, V)}, got {x.dtype} {tuple(x.shape)}")
    return x.contiguous()


def _forward(q, k, v, g, scale, h0, want_ht, plan, slots=None, ht_out=None, open_kv=None):
    """Returns (o [B, T, H, V], ht [N, H, K, V] or None, seg_init [max_seg, H, K, V] or None).

    With `slots`, h0 and ht are one state pool indexed by slots[n] (in place). With `open_kv` (aligned prefill),
    partial last chunks go to those open-chunk buffers instead of the state."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    qf, sq = _flat(q)
    kf, sk = _flat(k)
    vf, sv = _flat(v)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    prec, lowp = _prec(q.dtype)
    bt, bv, warps, stages = plan.fwd
    nv = V // bv
    ht = ht_out if ht_out is not None else (
        torch.empty(plan.N, H, K, V, device=q.device, dtype=torch.float32) if want_ht else None)
    dummy = o
    cu, seg_seq, seg_ptr = plan.args()
    seg_init = None
    if plan.split:
        local = torch.empty(plan.max_seg, H, K, V, device=q.device, dtype=torch.float32)
        kern._local_state_kernel[(plan.max_seg * H * nv,)](
            kf, vf, g, local, cu, seg_seq, seg_ptr, sk, sv, 1.0, T, plan.L,
            H=H, K=K, V=V, BT=bt, BV=bv, VARLEN=True, REVERSE=False, LOWP=lowp, PREC=prec,
            num_warps=warps, num_stages=stages)
        seg_init = torch.empty_like(local)
        _scan(local, seg_init, g, h0, ht, slots, plan, H, K * V, reverse=False)
    kern._fwd_kernel[(plan.n_seg * H * nv,)](
        qf, kf, vf, o, g, h0 if h0 is not None else dummy, ht if ht is not None else dummy,
        slots if slots is not None else dummy, seg_init if seg_init is not None else dummy,
        cu if cu is not None else dummy, seg_seq if seg_seq is not None else dummy,
        seg_ptr if seg_ptr is not None else dummy,
        open_kv[0] if open_kv is not None else dummy, open_kv[1] if open_kv is not None else dummy,
        sq, sk, sv, scale, T, plan.L,
        H=H, K=K, V=V, BT=bt, BV=bv, VARLEN=plan.varlen, SPLIT=plan.split, HAS_H0=h0 is not None,
        STORE_HT=(ht is not None) and not plan.split, USE_SLOTS=slots is not None, LOWP=lowp, PREC=prec,
        ALIGNED=open_kv is not None, num_warps=warps, num_stages=stages, **plan.launch)
    return o, ht, seg_init


def _scan(local, seg_state, g, x0, xN, slots, plan, H, KV, reverse):
    block = min(KV, 1024)
    dummy = local
    kern._scan_kernel[(plan.N * H, KV // block)](
        local, seg_state, g, x0 if x0 is not None else dummy, xN if xN is not None else dummy,
        slots if slots is not None else dummy, plan.cu, plan.seg_ptr, plan.L,
        H=H, KV=KV, BLOCK=block, HAS_X0=x0 is not None, STORE_XN=xN is not None, USE_SLOTS=slots is not None,
        REVERSE=reverse, num_warps=4)


def _backward(do, dht, q, k, v, g, scale, h0, seg_init, plan, need_dh0):
    """Three sweeps, each exact on its own block split: dq (forward, key blocks), dk (reverse, key blocks) and
    dv (reverse, value blocks; also dL/dh0). Long sequences first get each segment's end gradient from a
    reverse local pass plus a scan."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    qf, sq = _flat(q)
    kf, sk = _flat(k)
    vf, sv = _flat(v)
    dof, sdo = _flat(do.to(q.dtype))
    prec, lowp = _prec(q.dtype)
    bt, (bk_q, w_q), (bk_k, w_k), (bv_v, w_v), stages = _bwd_blocks(K, V, q.dtype)
    cu, seg_seq, seg_ptr = plan.args()
    dummy = qf
    cu_ = cu if cu is not None else dummy
    seg_seq_ = seg_seq if seg_seq is not None else dummy
    seg_ptr_ = seg_ptr if seg_ptr is not None else dummy
    common = dict(H=H, K=K, V=V, BT=bt, VARLEN=plan.varlen, SPLIT=plan.split, LOWP=lowp, PREC=prec, num_stages=stages)
    dq = torch.empty(B, T, H, K, device=q.device, dtype=q.dtype)
    kern._bwd_dq_kernel[(plan.n_seg * H * (K // bk_q),)](
        kf, vf, dof, dq, g, h0 if h0 is not None else dummy, seg_init if seg_init is not None else dummy,
        cu_, seg_seq_, seg_ptr_, sk, sv, sdo, scale, T, plan.L,
        BK=bk_q, HAS_H0=h0 is not None, num_warps=w_q, **common)
    dh0 = torch.empty(plan.N, H, K, V, device=q.device, dtype=torch.float32) if need_dh0 else None
    g_end = None
    if plan.split:
        local = torch.empty(plan.max_seg, H, K, V, device=q.device, dtype=torch.float32)
        bts, bvs, ws, ss = plan.fwd
        kern._local_state_kernel[(plan.max_seg * H * (V // bvs),)](
            qf, dof, g, local, cu, seg_seq, seg_ptr, sq, sdo, scale, T, plan.L,
            H=H, K=K, V=V, BT=bts, BV=bvs, VARLEN=True, REVERSE=True, LOWP=lowp, PREC=prec,
            num_warps=ws, num_stages=ss)
        g_end = torch.empty_like(local)
        _scan(local, g_end, g, dht, dh0, None, plan, H, K * V, reverse=True)
    g_end_ = g_end if g_end is not None else dummy
    dht_ = dht if dht is not None else dummy
    dk = torch.empty(B, T, H, K, device=q.device, dtype=q.dtype)
    kern._bwd_dk_kernel[(plan.n_seg * H * (K // bk_k),)](
        qf, vf, dof, dk, g, dht_, g_end_, cu_, seg_seq_, seg_ptr_, sq, sv, sdo, scale, T, plan.L,
        BK=bk_k, HAS_DHT=dht is not None, num_warps=w_k, **common)
    dv = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    kern._bwd_dv_kernel[(plan.n_seg * H * (V // bv_v),)](
        qf, kf, dof, dv, g, dht_, dh0 if dh0 is not None else dummy, g_end_, cu_, seg_seq_, seg_ptr_,
        sq, sk, sdo, scale, T, plan.L,
        BV=bv_v, HAS_DHT=dht is not None, STORE_DH0=need_dh0 and not plan.split, num_warps=w_v, **common)
    return dq, dk, dv, dh0


def _aligned_as_prefill(q, k, v, g, scale, plan):
    """The aligned training forward, run as aligned serving's prefill from fresh (zero) state slots, so both are
    one compiled kernel with the same arguments' kinds: a position's bits cannot depend on which one ran it."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = plan.N
    pool = torch.zeros(N, H, K, V, device=q.device, dtype=torch.float32)
    BT = plan.fwd[0]
    open_k = torch.empty(N, BT, H, K, device=q.device, dtype=q.dtype)
    open_v = torch.empty(N, BT, H, V, device=q.device, dtype=q.dtype)
    slots = torch.arange(N, device=q.device, dtype=torch.int32)
    if plan.cu is None:
        plan.cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        plan.varlen = True
    qf, kf, vf = (x.reshape(1, B * T, H, -1) for x in (q, k, v))
    o, _, _ = _forward(qf, kf, vf, g, scale, pool, True, plan, slots=slots, ht_out=pool, open_kv=(open_k, open_v))
    return o.view(B, T, H, V)


class _LightningAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, want_ht, cu_seqlens, training, aligned):
        B, T, H, K = q.shape
        plan = _Plan(B, T, H, K, v.shape[-1], cu_seqlens, q.device, q.dtype, training=training, aligned=aligned)
        if aligned:  # exactly the compiled variant aligned serving prefills with: zero state slots, open chunks
            o, ht, seg_init = _aligned_as_prefill(q, k, v, g, scale, plan), None, None
        else:
            o, ht, seg_init = _forward(q, k, v, g, scale, h0, want_ht, plan)
        ctx.save_for_backward(q, k, v, g, h0, seg_init)
        ctx.plan, ctx.scale = plan, scale
        ctx.set_materialize_grads(False)  # an unused final state must not cost a zero-filled dht
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, seg_init = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(q[..., :1]).expand(*q.shape[:3], v.shape[-1])
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dh0 = _backward(do, dht, q, k, v, g, ctx.scale, h0, seg_init, ctx.plan, need_dh0)
        return dq, dk, dv, None, None, dh0, None, None, None, None


def _prep(q, k, v, g_gamma, scale):
    _check(q, k, v, g_gamma)
    g = g_gamma.to(device=q.device, dtype=torch.float32).contiguous()
    return g, (q.shape[-1] ** -0.5 if scale is None else float(scale))


def lightning_attn(q, k, v, g_gamma, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   chunk_size=64, aligned=False):
    """Chunked lightning attention with autograd. Returns (o [B, T, H, V] in q.dtype, final [N, H, K, V] fp32).
    aligned: the fixed plan that serving's aligned prefill and decode reproduce bit for bit."""
    g, scale = _prep(q, k, v, g_gamma, scale)
    B, T, H, K = q.shape
    if aligned and (initial_state is not None or output_final_state):
        raise ValueError("aligned lightning attention starts from a zero state and returns no final state")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed input (cu_seqlens) needs B == 1, got B={B}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = _states(initial_state, N, H, K, v.shape[-1], "initial_state")
    # grad mode is off inside Function.forward, so whether a backward will follow is decided here
    training = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, h0))
    return _LightningAttnFn.apply(q, k, v, g, scale, h0, bool(output_final_state), cu_seqlens, training,
                                  bool(aligned))


def lightning_attn_prefill(q, k, v, g_gamma, state, slot_ids, cu_seqlens, scale=None, chunk_size=64, plans=None,
                           segmented=False):
    """Serving prefill: continue each packed sequence from state[slot_ids[n]] and write its new state back in
    place, all requests in one pass. Slots must be distinct. Returns o [1, T, H, V].

    segmented: cut sequences into segments whatever their count (the CUDA-graph prefill, whose sequence count
    includes empty and padding sequences and so says nothing about how long the live ones are).

    plans: a dict the caller keeps while cu_seqlens stays as it is (the engine: one step). The launch plan depends
    only on cu_seqlens and the shapes, and a split plan costs ~12 small device ops to build; every linear layer of
    a step would rebuild the same one. Same values either way: the numbers do not change."""
    g, scale = _prep(q, k, v, g_gamma, scale)
    B, T, H, K = q.shape
    if B != 1:
        raise ValueError(f"prefill takes packed input [1, T, H, D], got B={B}")
    V = v.shape[-1]
    if state.dtype != torch.float32 or state.shape[1:] != (H, K, V) or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous fp32 pool [S, H, K, V], got {state.dtype} {tuple(state.shape)}")
    slots = slot_ids.to(device=q.device, dtype=torch.int32)
    key = (id(cu_seqlens), B, T, H, K, V, q.device, q.dtype, repr(sorted(TUNE.items())), segmented)
    plan = plans.get(key) if plans is not None else None
    if plan is None:
        plan = _Plan(B, T, H, K, V, cu_seqlens, q.device, q.dtype, segmented=segmented)
        if plans is not None:
            plans[key] = plan
    with torch.no_grad():
        o, _, _ = _forward(q, k, v, g, scale, state, True, plan, slots=slots, ht_out=state)
    return o


def _decode_block(rows: int, V: int, device) -> tuple[int, int]:
    """64-wide value blocks with 8 warps whenever they still give ~2 programs per SM (H200: batch 64 37.5 us,
    batch 256 133 us, against 39.5 / 142 us at 128-wide); narrower for small batches, which are launch-bound."""
    want = 2 * _sms(device)
    for bv, warps in ((64, 8), (32, 4)):
        if bv <= V and rows * (V // bv) >= want:
            return bv, warps
    return min(V, 16), 2


def lightning_attn_decode(q, k, v, g_gamma, state, slot_ids=None, scale=None, out=None):
    """One token per request, q, k [N, H, K], v [N, H, V]; updates state[slot_ids] ([S, H, K, V] fp32) in place.

    No host syncs and, with `out` ([N, H, V] in q.dtype), no allocations: safe to capture in a CUDA graph.
    `g_gamma` must already be fp32 on the device for that. Slots must be distinct."""
    N, H, K = q.shape
    V = v.shape[-1]
    if g_gamma.dtype != torch.float32 or g_gamma.device != q.device:
        g_gamma = g_gamma.to(device=q.device, dtype=torch.float32)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(1) != K or k.stride(1) != K \
            or v.stride(1) != V:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if out is None:
        out = torch.empty(N, H, V, device=q.device, dtype=q.dtype)
    bv, warps = TUNE["decode"] if "decode" in TUNE else _decode_block(N * H, V, q.device)
    kern._decode_kernel[(N * H * (V // bv),)](
        q, k, v, out, g_gamma, state, slot_ids if slot_ids is not None else out,
        q.stride(0), k.stride(0), v.stride(0), K ** -0.5 if scale is None else float(scale),
        H=H, K=K, V=V, BV=bv, USE_SLOTS=slot_ids is not None, num_warps=warps)
    return out
