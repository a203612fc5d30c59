"""Fused MoE benchmark at the Ring-mini-linear-2.0 MoE shape (hidden 2048, 256 experts of 512, top-8, groups 8/4, bf16).

Same card, same run: the fused Triton MoE (router + sort + gate/up+SwiGLU + down + combine), a pipeline on
`torch._grouped_mm` with the same routing (router in torch, fp32), the reference loop over experts, the
dense-equivalent GEMMs (same FLOPs, one big GEMM each) and the weight-read floor (bytes of the experts touched at
least once / measured device-to-device copy bandwidth). Also checks accuracy against an fp64 reference, bitwise
repeatability and batch invariance. Prints a table and a final JSON line.

    PYTHONPATH=. python benchmarks/moe.py [--tokens 64 1024 8192] [--sweep] [--lm-head]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from ringlinear.ops.moe import reference as ref
from ringlinear.ops.moe import triton as fused
from ringlinear.ops.moe import triton_gemm, triton_route

H, E, INTER, K, NG, TG, SCALE = 2048, 256, 512, 8, 8, 4, 2.5
ROUTE = dict(top_k=K, n_group=NG, topk_group=TG, routed_scaling_factor=SCALE, norm_topk_prob=True)
DEV = "cuda"


def bench(fn, rep=200):
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def bench_slow(fn, n=3):
    """Median of n event-timed calls (for the loop over experts, ~tens of ms per call)."""
    fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def copy_bandwidth():
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e9  # TB/s, bytes read + written


# ---- baselines ----------------------------------------------------------------------------------------------------

def torch_route(x, wr, bias):
    """The router in stock torch (fp32 logits, topk instead of stable sorts: same choice up to exact ties)."""
    N = x.shape[0]
    logits = F.linear(x.float(), wr.float())
    p = logits.sigmoid()
    sel = p + bias
    gs = sel.view(N, NG, E // NG).topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(TG, -1).indices, True)
    sel = sel.masked_fill(~keep.repeat_interleave(E // NG, 1), float("-inf"))
    idx = sel.topk(K, -1).indices
    w = p.gather(1, idx)
    return idx, w / (w.sum(-1, keepdim=True) + 1e-20) * SCALE, logits


def grouped_mm_experts(x, idx, w, w13, w2):
    """Sort pairs by expert, gather, two torch._grouped_mm calls, SwiGLU, un-permute, fp32 weighted sum."""
    N = x.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.searchsorted(flat[order], torch.arange(1, E + 1, device=x.device)).to(torch.int32)
    xs = x[order // K]
    gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=ends)
    hh = F.silu(gu[:, :INTER]) * gu[:, INTER:]
    o = torch._grouped_mm(hh, w2.transpose(1, 2), offs=ends)
    out = torch.empty_like(o).index_copy(0, order, o)
    return (out.view(N, K, H).float() * w[..., None]).sum(1).to(x.dtype)


def grouped_mm_moe(x, wr, bias, w13, w2):
    idx, w, _ = torch_route(x, wr, bias)
    return grouped_mm_experts(x, idx, w, w13, w2)


# ---- helpers ------------------------------------------------------------------------------------------------------

def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_weights(seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    wr = (torch.randn(E, H, device=DEV, generator=g) * H ** -0.5).bfloat16()
    bias = torch.randn(E, device=DEV, generator=g) * 1e-3
    w13 = (torch.randn(E, 2 * INTER, H, device=DEV, generator=g) * H ** -0.5).bfloat16()
    w2 = (torch.randn(E, H, INTER, device=DEV, generator=g) * INTER ** -0.5).bfloat16()
    return wr, bias, w13, w2


def fused_fwd(x, wr, bias, w13, w2, **kw):
    return fused.moe_forward(x, wr, bias, w13, w2, None, **ROUTE, **kw)[0]


def fwd_bwd(fn, x, wr, w13, w2, gy):
    leaves = [t.detach().requires_grad_(True) for t in (x, wr, w13, w2)]

    def run():
        y = fn(*leaves)
        return torch.autograd.grad(y, leaves, gy)
    return run


def check_exactness(x, wr, bias, w13, w2):
    """Bitwise repeatability and batch invariance (rows alone and in a 64-row batch equal the full batch's)."""
    y = fused_fwd(x, wr, bias, w13, w2)
    rep = torch.equal(y, fused_fwd(x, wr, bias, w13, w2))
    inv = torch.equal(fused_fwd(x[:64], wr, bias, w13, w2), y[:64])
    for i in (0, x.shape[0] // 2 + 3, x.shape[0] - 1):
        inv &= torch.equal(fused_fwd(x[i:i + 1], wr, bias, w13, w2)[0], y[i])
    return rep, inv


def run_point(N, wr, bias, w13, w2, bw, with_loop=True):
    g = torch.Generator(device=DEV).manual_seed(N)
    x = torch.randn(N, H, device=DEV, generator=g).bfloat16()
    gy = torch.randn(N, H, device=DEV, generator=g).bfloat16()
    r = dict(tokens=N)

    # accuracy: fused and the bf16 reference, each against fp64 on the fused routing
    y, idx, w, _ = fused.moe_forward(x, wr, bias, w13, w2, None, **ROUTE)
    ridx, _, _ = ref.route(x, wr, bias, **ROUTE)
    r["router_rows_equal_ref"] = (idx == ridx).all(1).float().mean().item()
    tidx = torch_route(x, wr, bias)[0]
    r["router_rows_equal_torch"] = (idx.sort(1).values == tidx.sort(1).values).all(1).float().mean().item()
    y64 = ref.moe_experts(x.double(), idx, w.double(), w13.double(), w2.double())
    r["rel_err_fused_vs_fp64"] = rel(y, y64)
    r["rel_err_refbf16_vs_fp64"] = rel(ref.moe_experts(x, idx, w, w13, w2), y64)
    r["rel_err_grouped_mm_vs_fp64"] = rel(grouped_mm_experts(x, idx, w, w13, w2), y64)
    del y64
    r["bitwise_repeatable"], r["batch_invariant"] = check_exactness(x, wr, bias, w13, w2)

    # forward times (ms)
    r["fused_fwd"] = bench(lambda: fused_fwd(x, wr, bias, w13, w2))
    r["fused_fwd_graph"] = graph_time(lambda: fused_fwd(x, wr, bias, w13, w2))
    try:
        r["grouped_mm_fwd_graph"] = graph_time(lambda: grouped_mm_moe(x, wr, bias, w13, w2))
    except RuntimeError as e:
        r["grouped_mm_fwd_graph"] = None
        r["grouped_mm_graph_error"] = str(e)[:200]
    r["fused_fwd_atomic"] = bench(lambda: fused_fwd(x, wr, bias, w13, w2, deterministic=False))
    r["grouped_mm_fwd"] = bench(lambda: grouped_mm_moe(x, wr, bias, w13, w2))
    r["grouped_mm_experts_only"] = bench(lambda: grouped_mm_experts(x, idx, w, w13, w2))
    r["fused_experts_only"] = bench(lambda: fused.moe_experts(x, idx, w, w13, w2))
    if with_loop:
        r["loop_fwd"] = bench_slow(lambda: ref.moe_forward(x, wr, bias, w13, w2, None, **ROUTE))
    a13 = torch.randn(N * K, H, device=DEV, dtype=torch.bfloat16)
    b13 = torch.randn(H, 2 * INTER, device=DEV, dtype=torch.bfloat16)
    a2 = torch.randn(N * K, INTER, device=DEV, dtype=torch.bfloat16)
    b2 = torch.randn(INTER, H, device=DEV, dtype=torch.bfloat16)
    r["dense_equiv"] = bench(lambda: a13 @ b13) + bench(lambda: a2 @ b2)
    touched = torch.unique(idx).numel()
    r["experts_touched"] = touched
    r["floor"] = touched * 3 * H * INTER * 2 / (bw * 1e12) * 1e3
    r["kernels_fwd_us"] = kernel_profile(N, wr, bias, w13, w2)
    r["kernels_fwdbwd_us"] = kernel_profile(N, wr, bias, w13, w2, backward=True)

    # forward + backward
    r["fused_fwdbwd"] = bench(fwd_bwd(lambda *a: fused_fwd(a[0], a[1], bias, a[2], a[3]), x, wr, w13, w2, gy))
    try:
        r["grouped_mm_fwdbwd"] = bench(fwd_bwd(lambda *a: grouped_mm_moe(a[0], a[1], bias, a[2], a[3]),
                                               x, wr, w13, w2, gy))
    except RuntimeError as e:  # a torch without _grouped_mm backward
        r["grouped_mm_fwdbwd"] = None
        r["grouped_mm_fwdbwd_error"] = str(e)[:200]
    if N <= 1024:  # gradients vs autograd through the reference, and bitwise-repeatable backward
        got = fwd_bwd(lambda *a: fused_fwd(a[0], a[1], bias, a[2], a[3]), x, wr, w13, w2, gy)()
        again = fwd_bwd(lambda *a: fused_fwd(a[0], a[1], bias, a[2], a[3]), x, wr, w13, w2, gy)()
        want = fwd_bwd(lambda *a: ref.moe_forward(a[0], a[1], bias, a[2], a[3], None, **ROUTE)[0],
                       x, wr, w13, w2, gy)()
        r["grad_rel_err_vs_ref"] = {n: rel(a, b) for n, a, b in zip(("x", "router", "w13", "w2"), got, want)}
        r["grad_bitwise_repeatable"] = all(torch.equal(a, b) for a, b in zip(got, again))
    r["speedup_fwd_vs_grouped_mm"] = r["grouped_mm_fwd"] / r["fused_fwd"]
    r["fwd_pct_of_floor"] = 100 * r["floor"] / r["fused_fwd"]
    return r


# candidate (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per kernel; the router's are (BLOCK_T, BLOCK_E, BLOCK_K, ...)
SWEEP = {
    "router": [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (32, 64, 64, 4, 4), (128, 64, 64, 8, 3)],
    "topk": [(16, 4), (16, 2), (8, 1), (32, 4), (4, 1)],  # (BLOCK_T, warps)
    "gateup": [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
    "down": [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 4)],
    "dswiglu": [(64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 64, 8, 4)],
    "dx": [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)],
    "wgrad": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3)],
}


def _set_cfg(key, c):
    if key == "topk":
        triton_route.TOPK_CFG.update(BLOCK_T=c[0], num_warps=c[1])
    elif key == "router":
        triton_route.ROUTER_CFG.update(BLOCK_T=c[0], BLOCK_E=c[1], BLOCK_K=c[2], num_warps=c[3], num_stages=c[4])
    else:
        triton_gemm.GEMM_CFG[key] = dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], num_warps=c[3], num_stages=c[4])


def sweep(tokens, wr, bias, w13, w2, kernels):
    """Time each kernel under candidate block configs, then apply the best per kernel and tier (normalised time
    summed over the token counts of the tier) for the rest of the run. A development aid: the chosen configs are
    then written into ROUTER_CFG / GEMM_CFG."""
    times = {}
    G = triton_gemm
    for N in tokens:
        x = torch.randn(N, H, device=DEV).bfloat16()
        dy = torch.randn(N, H, device=DEV).bfloat16()
        idx, w, _ = triton_route.router_forward(x, wr, bias, K, NG, TG, SCALE, True)
        pair, eoff = triton_route.make_plan(idx, E)
        h, ab = G.gateup(x, w13, pair, eoff, K, save_ab=True)
        dab, _ = G.dswiglu(dy, w2, ab, h, w, pair, eoff, K)
        o = torch.empty(N * K, H, dtype=x.dtype, device=DEV)
        g2, g13 = torch.empty_like(w2), torch.empty_like(w13)
        ds = (w2.stride(0), w2.stride(1), w2.stride(2))
        xs = (w13.stride(0), w13.stride(2), w13.stride(1))
        calls = {
            "router": lambda: triton_route.router_forward(x, wr, bias, K, NG, TG, SCALE, True),
            "topk": lambda: triton_route.router_forward(x, wr, bias, K, NG, TG, SCALE, True),
            "gateup": lambda: G.gateup(x, w13, pair, eoff, K, save_ab=False),
            "down": lambda: G.rows_gemm(h, w2, ds, H, pair, eoff, K, o),
            "dswiglu": lambda: G.dswiglu(dy, w2, ab, h, w, pair, eoff, K),
            "dx": lambda: G.rows_gemm(dab, w13, xs, H, pair, eoff, K, o, which="dx"),
            "wgrad": lambda: (G.wgrad(dy, h, g2, pair, eoff, K, True, False, wt=w),
                              G.wgrad(dab, x, g13, pair, eoff, K, False, True)),
        }
        tier = "_large" if N * K >= G.LARGE_ROWS_PER_EXPERT * E else ""
        for which in kernels:
            cands = SWEEP[which]
            key = which + tier if which + tier in G.GEMM_CFG else which
            tables = {"router": triton_route.ROUTER_CFG, "topk": triton_route.TOPK_CFG}
            saved = dict(tables[which] if which in tables else G.GEMM_CFG[key])
            for c in cands:
                _set_cfg(key, c)
                try:
                    t = bench(calls[which], rep=100)
                except Exception as e:  # noqa: BLE001  (a config that does not compile is a result too)
                    t = float("inf")
                    print(f"  {which} {c}: {type(e).__name__}: {str(e)[:120]}")
                times.setdefault(key, {}).setdefault(c, {})[N] = t
                print(f"sweep {key:14s} N={N:5d} {str(c):24s} {t:.4f} ms")
            if which in tables:
                tables[which].update(saved)
            else:
                G.GEMM_CFG[key] = saved
    chosen = {}
    for key, per_cfg in times.items():
        ns = next(iter(per_cfg.values())).keys()
        best_t = {n: min(v[n] for v in per_cfg.values()) for n in ns}
        chosen[key] = min(per_cfg, key=lambda c: sum(per_cfg[c][n] / best_t[n] for n in ns))
        _set_cfg(key, chosen[key])
    print("chosen configs:", chosen)
    return {k: {str(c): v for c, v in d.items()} for k, d in times.items()}, {k: list(v) for k, v in chosen.items()}


def kernel_profile(N, wr, bias, w13, w2, backward=False):
    """GPU time per kernel of one fused call (torch profiler, mean over 10 calls), in microseconds."""
    x = torch.randn(N, H, device=DEV).bfloat16().requires_grad_(backward)
    gy = torch.randn(N, H, device=DEV).bfloat16()
    leaves = [t.detach().requires_grad_(backward) for t in (wr, w13, w2)]

    def call():
        y = fused.moe_forward(x, leaves[0], bias, leaves[1], leaves[2], None, **ROUTE)[0]
        if backward:
            torch.autograd.grad(y, [x, *leaves], gy)
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    res = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            res[ev.key[:60]] = t / 10
    return dict(sorted(res.items(), key=lambda kv: -kv[1]))


def graph_time(fn):
    """Median replay time of fn captured in a CUDA graph (no launch overhead: how a decode step runs it)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay)


def lm_head_bench():
    from ringlinear.ops.lm_head import triton as lmt
    V = 157184
    w = (torch.randn(V, H, device=DEV) * H ** -0.5).bfloat16()
    res = {}
    for N in (1, 64, 8192):
        x = torch.randn(N, H, device=DEV).bfloat16()
        out = lmt.lm_head_fp32(x, w)
        res[N] = dict(
            rel_err_vs_fp32=rel(out, F.linear(x.float(), w.float())),
            batch_invariant=bool(torch.equal(lmt.lm_head_fp32(x[:1], w)[0], out[0])),
            triton=bench(lambda: lmt.lm_head_fp32(x, w)),
            mm_out_dtype=bench(lambda: torch.mm(x, w.t(), out_dtype=torch.float32)),
            fp32_upcast=bench(lambda: F.linear(x.float(), w.float())),
            weight_floor=V * H * 2 / 1e9,  # GB: divide by TB/s -> ms
        )
        print(f"lm_head N={N}: {res[N]}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 1024, 8192])
    ap.add_argument("--sweep", nargs="*", default=None, metavar="KERNEL",
                    help="time candidate configs of these kernels (all when none named) and use the best")
    ap.add_argument("--lm-head", action="store_true")
    ap.add_argument("--no-loop", action="store_true", help="skip the (slow) loop-over-experts baseline")
    args = ap.parse_args()

    card = torch.cuda.get_device_name()
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    print(f"card: {card}; torch {torch.__version__}; copy bandwidth {bw:.2f} TB/s (read + write)")
    wr, bias, w13, w2 = make_weights()
    result = dict(date=datetime.date.today().isoformat(), card=card, torch=torch.__version__, copy_tb_s=bw,
                  shape=dict(hidden=H, experts=E, inter=INTER, top_k=K, n_group=NG, topk_group=TG))
    if args.sweep is not None:
        result["sweep"], result["chosen_configs"] = sweep(args.tokens, wr, bias, w13, w2, args.sweep or list(SWEEP))
    if args.lm_head:
        result["lm_head"] = lm_head_bench()
    points = [run_point(N, wr, bias, w13, w2, bw, with_loop=not args.no_loop) for N in args.tokens]
    result["points"] = points

    print(f"\nFused MoE, {card}, ms (median); floor = touched expert weights / {bw:.2f} TB/s")
    hdr = ("tokens", "fused", "atomic", "grouped_mm", "speedup", "loop", "dense-eq", "floor", "%floor",
           "fused f+b", "g_mm f+b", "err fused", "err ref", "bitwise", "invariant")
    print(" | ".join(f"{h:>10s}" for h in hdr))
    for r in points:
        row = (r["tokens"], r["fused_fwd"], r["fused_fwd_atomic"], r["grouped_mm_fwd"], r["speedup_fwd_vs_grouped_mm"],
               r.get("loop_fwd", float("nan")), r["dense_equiv"], r["floor"], r["fwd_pct_of_floor"],
               r["fused_fwdbwd"], r["grouped_mm_fwdbwd"] or float("nan"), r["rel_err_fused_vs_fp64"],
               r["rel_err_refbf16_vs_fp64"], r["bitwise_repeatable"], r["batch_invariant"])
        print(" | ".join(f"{v:>10}" if isinstance(v, (int, bool)) else f"{v:>10.4g}" for v in row))
    for r in points:
        for kind in ("kernels_fwd_us", "kernels_fwdbwd_us"):
            print(f"{kind} N={r['tokens']}: " + ", ".join(f"{k} {v:.1f}" for k, v in list(r[kind].items())[:12]))
        print(f"graph replay N={r['tokens']}: fused {r['fused_fwd_graph']:.4f} ms, "
              f"grouped_mm {r['grouped_mm_fwd_graph'] or float('nan'):.4f} ms")
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
