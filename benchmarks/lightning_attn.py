#!/usr/bin/env python3
"""Lightning-attention benchmark: ringlinear Triton kernels vs flash-linear-attention 0.6 and torch SDPA.

Run on one CUDA GPU:  PYTHONPATH=. python3 benchmarks/lightning_attn.py [--tune] [--quick] [--lengths 16384] [--skip-decode]
Prints tables and, last, one JSON line; with $OUT set it also writes $OUT/lightning_attn.json.

Measured in one process on the same data: the device copy bandwidth; accuracy against an fp64 reference
(bf16 inputs, T=64K, smallest decay of Ring-mini-linear-2.0, initial state and final-state gradient included);
forward and forward+backward Mtok/s at T = 4K, 16K, 64K with B*T = 64K tokens, H = 16, D = 128; decode us per
call for batch 1, 16, 64, 256 (fp32 states [B, 16, 128, 128]), eager and replayed from a CUDA graph.
fla is optional (skipped with a note if not importable).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from ringlinear.ops.lightning_attn.decay import layer_log_decay

H, D, TOKENS = 16, 128, 65536


def g_gamma_for_layer(layer: int, num_layers: int = 20) -> torch.Tensor:
    """HF layer factor (docs/decay.md); the deepest layer has the smallest decay."""
    return layer_log_decay(H, layer, num_layers, "hf")


def bench_ms(fn, warmup=25, rep=100, grad_to_none=None) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))  # callers pass detached or no-grad tensors


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, bytes read + written."""
    n = 1 << 29
    x = torch.empty(n, device="cuda", dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), warmup=5, rep=50)
    return 2 * x.numel() * 4 / ms / 1e6


def load_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
        import fla
        return chunk_simple_gla, fused_recurrent_simple_gla, getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001  (the baseline is optional; say why it is missing)
        print(f"# fla not available: {type(e).__name__}: {e}")
        return None, None, None


def rand_qkv(B, T, dtype, requires_grad=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen) for _ in range(3))
    # QK-norm'd activations in the model have unit RMS per head, like these.
    q, k, v = (x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v))
    return q, k, v


# ------------------------------------------------------------------------------------------------ accuracy

def accuracy(la, ref, fla_chunk, T=65536, small=True):
    """bf16 inputs vs an fp64 reference at T (smallest decay), with h0 and dht; fp32 small-shape checks."""
    out = {}
    g = g_gamma_for_layer(19).cuda()
    q, k, v = rand_qkv(1, T, torch.bfloat16, requires_grad=True, seed=1)
    gen = torch.Generator(device="cuda").manual_seed(2)
    h0 = torch.randn(1, H, D, D, device="cuda", generator=gen).requires_grad_()
    do = torch.randn(1, T, H, D, device="cuda", generator=gen).bfloat16()
    dht = torch.randn(1, H, D, D, device="cuda", generator=gen)
    o, ht = la.lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True)
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), (q, k, v, h0))
    xs = [x.detach().double().requires_grad_() for x in (q, k, v, h0)]
    ro, rht = ref.lightning_attn(*xs[:3], g.double(), initial_state=xs[3], output_final_state=True)
    rgrads = torch.autograd.grad((ro * do.double()).sum() + (rht * dht.double()).sum(), xs)
    finite = all(bool(torch.isfinite(t).all()) for t in (o, ht, *grads))
    out["ours"] = dict(o=rel(o, ro), final_state=rel(ht, rht), dq=rel(grads[0], rgrads[0]),
                       dk=rel(grads[1], rgrads[1]), dv=rel(grads[2], rgrads[2]), dh0=rel(grads[3], rgrads[3]),
                       finite=finite)
    if fla_chunk is not None and small:
        fo, fht = fla_chunk(q, k, v, g_gamma=g, initial_state=h0, output_final_state=True)
        fgrads = torch.autograd.grad((fo.float() * do.float()).sum() + (fht * dht).sum(), (q, k, v, h0))
        out["fla"] = dict(o=rel(fo, ro), final_state=rel(fht, rht), dq=rel(fgrads[0], rgrads[0]),
                          dk=rel(fgrads[1], rgrads[1]), dv=rel(fgrads[2], rgrads[2]),
                          dh0=rel(fgrads[3], rgrads[3]))
    del xs, ro, rht, rgrads
    torch.cuda.empty_cache()
    out["small"] = small_checks(la, ref, fp32=small, dtypes=(torch.bfloat16, torch.float16) if small
                                else (torch.bfloat16,))
    return out


def small_checks(la, ref, fp32=True, dtypes=(torch.bfloat16, torch.float16)):
    """fp32 inputs (IEEE dots) vs fp64 at small shapes: every path the kernels have, worst relative error."""
    worst = 0.0
    gen = torch.Generator(device="cuda").manual_seed(3)
    cases = [(2, 300, 4, 128, None, None), (1, 1000, 2, 64, [0, 1, 300, 300, 1000], None),
             (1, 700, 2, 128, [0, 333, 700], 128), (2, 200, 2, 32, None, 64), (1, 260, 1, 256, None, None),
             (1, 400, 2, 256, [0, 150, 400], 128)]
    for B, T, h, d, cu, seg in (cases if fp32 else []):
        la.TUNE.pop("segment", None)
        if seg:
            la.TUNE["segment"] = seg
        cut = torch.tensor(cu, device="cuda") if cu else None
        N = B if cu is None else len(cu) - 1
        q, k, v = (torch.randn(B, T, h, d, device="cuda", generator=gen).requires_grad_() for _ in range(3))
        h0 = torch.randn(N, h, d, d, device="cuda", generator=gen).requires_grad_()
        g = -torch.rand(h, device="cuda", generator=gen)
        o, ht = la.lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cut)
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        gr = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), (q, k, v, h0))
        xs = [x.detach().double().requires_grad_() for x in (q, k, v, h0)]
        ro, rht = ref.lightning_attn(*xs[:3], g.double(), initial_state=xs[3], output_final_state=True,
                                     cu_seqlens=cut)
        rg = torch.autograd.grad((ro * do.double()).sum() + (rht * dht.double()).sum(), xs)
        errs = [rel(o, ro), rel(ht, rht)] + [rel(a, b) for a, b in zip(gr, rg)]
        # prefill into slots and decode, same data
        pool = torch.randn(N + 3, h, d, d, device="cuda", generator=gen)
        slots = torch.randperm(N + 3, device="cuda")[:N]
        if cu is not None:
            p1, p2 = pool.clone(), pool.clone()
            po = la.lightning_attn_prefill(q.detach(), k.detach(), v.detach(), g, p1, slots, cut)
            rpo = ref.lightning_attn_prefill(q.detach().double(), k.detach().double(), v.detach().double(),
                                             g.double(), p2.double(), slots, cut)
            errs += [rel(po, rpo)]
        qd, kd, vd = (torch.randn(N, h, d, device="cuda", generator=gen) for _ in range(3))
        p1, p2 = pool.clone(), pool.clone().double()
        od = la.lightning_attn_decode(qd, kd, vd, g, p1, slots)
        rod = ref.lightning_attn_decode(qd.double(), kd.double(), vd.double(), g.double(), p2, slots)
        errs += [rel(od, rod), rel(p1, p2)]
        worst = max(worst, max(errs))
        print(f"  fp32 check B={B} T={T} H={h} D={d} cu={cu} seg={seg}: max rel err {max(errs):.2e}")
    # 16-bit inputs on every head dim, against the budgets of docs/numerics.md
    rows16 = []
    for dt in dtypes:
        for d in (32, 64, 128, 256):
            q, k, v = (torch.randn(2, 333, 2, d, device="cuda", generator=gen).to(dt).requires_grad_()
                       for _ in range(3))
            g = -torch.rand(2, device="cuda", generator=gen)
            o, ht = la.lightning_attn(q, k, v, g, output_final_state=True)
            do = torch.randn_like(o)
            gr = torch.autograd.grad((o.float() * do.float()).sum(), (q, k, v))
            xs = [x.detach().double().requires_grad_() for x in (q, k, v)]
            ro, rht = ref.lightning_attn(*xs, g.double(), output_final_state=True)
            rg = torch.autograd.grad((ro * do.double()).sum(), xs)
            errs = [rel(o, ro), rel(ht, rht)] + [rel(a, b) for a, b in zip(gr, rg)]
            print(f"  {dt} D={d}: o {errs[0]:.1e} state {errs[1]:.1e} grads " +
                  " ".join(f"{e:.1e}" for e in errs[2:]))
            rows16.append(dict(dtype=str(dt), D=d, o=errs[0], state=errs[1], grads=max(errs[2:]),
                               ok=errs[0] <= 5e-3 and errs[1] <= 1e-3 and max(errs[2:]) <= 1e-2))
    la.TUNE.pop("segment", None)
    return dict(fp32_max_rel=worst, sixteen_bit=rows16)


# ------------------------------------------------------------------------------------------------ throughput

def prefill_train(la, fla_chunk, Ts, rep=50):
    rows = []
    g = g_gamma_for_layer(10).cuda()
    for T in Ts:
        rows.append(_prefill_train_at(la, fla_chunk, g, T, rep))
        torch.cuda.empty_cache()  # this length's tensors died with the call
    return rows


def _prefill_train_at(la, fla_chunk, g, T, rep):
    B = TOKENS // T
    q, k, v = rand_qkv(B, T, torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    r = dict(T=T, B=B)

    def fb(fn):
        def run():
            o = fn()
            o.backward(do)
        return run
    with torch.no_grad():
        r["ours_fwd_ms"] = bench_ms(lambda: la.lightning_attn(q, k, v, g)[0], rep=rep)
    # grad_to_none: a .grad accumulation (3 x 268 MB read-add-write) would add ~0.55 ms to every method
    r["ours_fwdbwd_ms"] = bench_ms(fb(lambda: la.lightning_attn(q, k, v, g)[0]), rep=rep, grad_to_none=[q, k, v])
    if fla_chunk is not None:
        with torch.no_grad():
            r["fla_fwd_ms"] = bench_ms(lambda: fla_chunk(q, k, v, g_gamma=g)[0], rep=rep)
        r["fla_fwdbwd_ms"] = bench_ms(fb(lambda: fla_chunk(q, k, v, g_gamma=g)[0]), rep=rep,
                                      grad_to_none=[q, k, v])
    qs = q.detach().transpose(1, 2).contiguous().requires_grad_()
    ks = k.detach()[:, :, :4].transpose(1, 2).contiguous().requires_grad_()
    vs = v.detach()[:, :, :4].transpose(1, 2).contiguous().requires_grad_()
    dos = do.transpose(1, 2).contiguous()

    def sdpa():
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    srep = 10 if T >= 16384 else rep
    with torch.no_grad():
        r["sdpa_fwd_ms"] = bench_ms(sdpa, warmup=5, rep=srep)
    r["sdpa_fwdbwd_ms"] = bench_ms(lambda: sdpa().backward(dos), warmup=5, rep=srep, grad_to_none=[qs, ks, vs])
    for key in list(r):
        if key.endswith("_ms"):
            r[key.replace("_ms", "_mtok_s")] = TOKENS / r[key] / 1e3
    return r


def graph_us(fn, n=200) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(n):
            graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / n)
    return sorted(times)[len(times) // 2]


def eager_us(fn, n=300) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6 / n)
    return sorted(times)[len(times) // 2]


def decode(la, fla_rec, batches):
    rows = []
    g = g_gamma_for_layer(10).cuda()
    for B in batches:
        gen = torch.Generator(device="cuda").manual_seed(4)
        q, k, v = (torch.randn(B, H, D, device="cuda", generator=gen).bfloat16() for _ in range(3))
        pool = torch.randn(B, H, D, D, device="cuda", generator=gen) * 0.1
        slots = torch.randperm(B, device="cuda", generator=gen)
        out = torch.empty(B, H, D, device="cuda", dtype=torch.bfloat16)
        state_bytes = 2 * B * H * D * D * 4
        r = dict(batch=B)

        def ours():
            la.lightning_attn_decode(q, k, v, g, pool, slots, out=out)
        r["ours_eager_us"] = eager_us(ours)
        r["ours_gpu_us"] = bench_ms(ours, rep=50) * 1e3
        r["ours_graph_us"] = graph_us(ours)
        if fla_rec is not None:
            q4, k4, v4 = (x[:, None] for x in (q, k, v))
            fpool = pool.clone()

            def theirs():
                return fla_rec(q4, k4, v4, g_gamma=g, initial_state=fpool, output_final_state=True)
            r["fla_eager_us"] = eager_us(theirs)
            r["fla_gpu_us"] = bench_ms(theirs, rep=50) * 1e3
            r["fla_graph_us"] = graph_us(theirs)
        for key in [x for x in r if x.endswith("graph_us")]:
            r[key.replace("graph_us", "graph_state_gb_s")] = state_bytes / r[key] / 1e3
        rows.append(r)
    return rows


def profile_kernels(la, T):
    """GPU time per kernel of one default forward+backward (torch.profiler), to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    g = g_gamma_for_layer(10).cuda()
    q, k, v = rand_qkv(TOKENS // T, T, torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    for _ in range(3):
        la.lightning_attn(q, k, v, g)[0].backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            la.lightning_attn(q, k, v, g)[0].backward(do)
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.key_averages():
        if ev.device_type is not None and "CUDA" in str(ev.device_type) and ev.count:
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            rows[ev.key[:60]] = t / 5 / 1e3
    for name, ms in sorted(rows.items(), key=lambda x: -x[1])[:10]:
        print(f"  T={T} {name}: {ms:.3f} ms per fwd+bwd")
    return rows


def tune(la, Ts):
    """Sweep launch configurations (TUNE in triton.py): backward block configs timed on the backward alone at
    T=4K, split program targets at the longest T, segment lengths of the split training call at T=16K (fwd+bwd,
    grads reset as in the tables), decode blocks. Prints ms per config."""
    res = {}
    g = g_gamma_for_layer(10).cuda()
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def timed(key, fn, grad_to_none=None):
        try:
            ms = bench_ms(fn, rep=30, grad_to_none=grad_to_none)
        except Exception as e:  # noqa: BLE001  (a config that does not compile or launch is a result too)
            ms = float("nan")
            print(f"  {key} failed: {type(e).__name__}: {str(e)[:300]}")
        res[key] = ms
        print(f"  tune {key}: {ms:.3f} ms", flush=True)
        return ms

    T = Ts[0]
    B = TOKENS // T
    q, k, v = rand_qkv(B, T, torch.bfloat16)
    do = torch.randn_like(q)
    plan = la._Plan(B, T, H, D, D, None, q.device, q.dtype)
    _, _, seg_init = la._forward(q, k, v, g, D ** -0.5, None, False, plan)
    for cfg in [(64, (32, 4), (32, 4), (32, 4), 2), (64, (64, 4), (64, 4), (64, 4), 2),
                (64, (32, 4), (32, 4), (32, 4), 3), (64, (64, 4), (32, 4), (32, 4), 2),
                (64, (32, 4), (64, 4), (32, 4), 2), (64, (32, 4), (32, 4), (64, 4), 2)]:
        la.TUNE.clear()
        la.TUNE["bwd"] = cfg
        timed(f"bwd-only T={T} cfg={cfg}",
              lambda: la._backward(do, None, q, k, v, g, D ** -0.5, None, seg_init, plan, False))
    del q, k, v, do
    T = Ts[-1]
    q, k, v = rand_qkv(TOKENS // T, T, torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    for progs in (4 * sms, 8 * sms):
        la.TUNE.clear()
        la.TUNE["programs"] = progs
        with torch.no_grad():
            timed(f"fwd T={T} programs={progs}", lambda: la.lightning_attn(q, k, v, g)[0])
        timed(f"fwdbwd T={T} programs={progs}", lambda: la.lightning_attn(q, k, v, g)[0].backward(do),
              grad_to_none=[q, k, v])
    del q, k, v, do
    if 16384 in Ts:  # the training point below its target: segment length of the split (4 x 4K by default)
        T = 16384
        q, k, v = rand_qkv(TOKENS // T, T, torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        for seg in (2048, 4096, 8192, 16384):  # 16384: one segment per sequence, through the split kernels
            la.TUNE.clear()
            la.TUNE["segment"] = seg
            timed(f"fwdbwd T={T} segment={seg}", lambda: la.lightning_attn(q, k, v, g)[0].backward(do),
                  grad_to_none=[q, k, v])
        la.TUNE.clear()
        timed(f"fwdbwd T={T} default", lambda: la.lightning_attn(q, k, v, g)[0].backward(do), grad_to_none=[q, k, v])
        for cfg in (None, (64, (32, 4), (32, 4), (32, 4), 2)):  # whole sequences: 64- and 32-wide backward blocks
            la.TUNE.clear()
            la.TUNE["unsplit"] = True
            if cfg:
                la.TUNE["bwd"] = cfg
            timed(f"fwdbwd T={T} unsplit bwd={cfg or 'default'}",
                  lambda: la.lightning_attn(q, k, v, g)[0].backward(do), grad_to_none=[q, k, v])
        del q, k, v, do
    la.TUNE.clear()
    for T in (Ts[0], Ts[-1]):
        res[f"profile T={T}"] = profile_kernels(la, T)
    for B in (1, 16, 64, 256):
        gen = torch.Generator(device="cuda").manual_seed(4)
        q, k, v = (torch.randn(B, H, D, device="cuda", generator=gen).bfloat16() for _ in range(3))
        pool = torch.randn(B, H, D, D, device="cuda", generator=gen) * 0.1
        out = torch.empty(B, H, D, device="cuda", dtype=torch.bfloat16)
        for dec in [None, (16, 2), (64, 8)]:
            la.TUNE.clear()
            if dec:
                la.TUNE["decode"] = dec
            us = graph_us(lambda: la.lightning_attn_decode(q, k, v, g, pool, None, out=out))
            res[f"decode B={B} cfg={dec}"] = us
            print(f"  tune decode B={B} {dec or 'default'}: {us:.1f} us, "
                  f"{2 * B * H * D * D * 4 / us / 1e3:.0f} GB/s", flush=True)
    la.TUNE.clear()
    return res


def kernel_report():
    """Registers and spills of every compiled variant (spills are the first suspect when a config is slow)."""
    from ringlinear.ops.lightning_attn import triton_kernels as kern
    rows = []
    for name in ("_fwd_kernel", "_local_state_kernel", "_scan_kernel", "_bwd_dq_kernel", "_bwd_dk_kernel",
                 "_bwd_dv_kernel", "_decode_kernel"):
        fn = getattr(kern, name)
        for dev_cache in getattr(fn, "device_caches", {}).values():
            cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
            for key, ck in cache.items():
                try:
                    rows.append(dict(kernel=name, regs=ck.n_regs, spills=ck.n_spills, warps=ck.metadata.num_warps,
                                     stages=ck.metadata.num_stages, smem=ck.metadata.shared))
                except Exception:  # noqa: BLE001  (introspection is best-effort across Triton versions)
                    pass
    for r in rows:
        print(f"  {r}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true", help="also sweep launch configurations")
    ap.add_argument("--quick", action="store_true", help="T=4K only, no accuracy at 64K")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--lengths", default="4096,16384,65536", help="comma list of T for the training table")
    ap.add_argument("--skip-decode", action="store_true", help="no decode table")
    ap.add_argument("--lean", action="store_true",
                    help="short run: no fp32/fp16 small checks, no fla accuracy (bf16 checks and T=64K kept)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/lightning_attn.py needs a CUDA GPU")
    import triton
    from ringlinear.ops.lightning_attn import reference as ref
    from ringlinear.ops.lightning_attn import triton as la

    prop = torch.cuda.get_device_properties(0)
    res = dict(card=prop.name, sms=prop.multi_processor_count, date=datetime.date.today().isoformat(),
               torch=torch.__version__, triton=triton.__version__)
    fla_chunk, fla_rec, res["fla"] = load_fla()
    print(f"# {res['card']} ({res['sms']} SMs), torch {res['torch']}, triton {res['triton']}, fla {res['fla']}, "
          f"{res['date']}")
    res["copy_gb_s"] = copy_bandwidth()
    print(f"# device copy bandwidth: {res['copy_gb_s']:.0f} GB/s (read + write)")
    try:
        Ts = [4096] if args.quick else sorted(int(t) for t in args.lengths.split(","))
    except ValueError:
        Ts = [0]
    if any(t <= 0 or TOKENS % t for t in Ts):
        sys.exit(f"--lengths: each T must divide {TOKENS} (B * T = {TOKENS} tokens), got {args.lengths}")

    def save():  # after every phase, so a run cut short still leaves its numbers
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "lightning_attn.json"), "w") as f:
                f.write(json.dumps(res, default=float) + "\n")
    if not args.skip_accuracy:
        res["accuracy"] = accuracy(la, ref, fla_chunk, T=4096 if args.quick else 65536, small=not args.lean)
        print("# accuracy vs fp64 (rel. RMS error), bf16 inputs, smallest decay:")
        for who, a in res["accuracy"].items():
            print(f"  {who}: {a}")
        save()
    res["train"] = prefill_train(la, fla_chunk, Ts)
    save()
    res["decode"] = [] if args.skip_decode else decode(la, fla_rec, [1, 16, 64, 256])
    save()

    print("\n| T | B | ours fwd | fla fwd | SDPA fwd | ours fwd+bwd | fla fwd+bwd | SDPA fwd+bwd | fwd x fla | "
          "fwd+bwd x fla |  (Mtok/s)")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["train"]:
        ff, fb = r.get("fla_fwd_mtok_s", float("nan")), r.get("fla_fwdbwd_mtok_s", float("nan"))
        print(f"| {r['T']} | {r['B']} | {r['ours_fwd_mtok_s']:.1f} | {ff:.1f} | {r['sdpa_fwd_mtok_s']:.1f} | "
              f"{r['ours_fwdbwd_mtok_s']:.1f} | {fb:.1f} | {r['sdpa_fwdbwd_mtok_s']:.2f} | "
              f"{r['ours_fwd_mtok_s'] / ff:.2f} | {r['ours_fwdbwd_mtok_s'] / fb:.2f} |")
    print("\n| batch | ours eager us | ours graph us | ours state GB/s (% copy) | fla eager us | fla graph us | "
          "fla GB/s (% copy) |")
    print("|---|---|---|---|---|---|---|")
    for r in res["decode"]:
        c = res["copy_gb_s"]
        o_bw = r["ours_graph_state_gb_s"]
        f_bw = r.get("fla_graph_state_gb_s", float("nan"))
        print(f"| {r['batch']} | {r['ours_eager_us']:.1f} | {r['ours_graph_us']:.1f} | {o_bw:.0f} "
              f"({100 * o_bw / c:.0f}%) | {r.get('fla_eager_us', float('nan')):.1f} | "
              f"{r.get('fla_graph_us', float('nan')):.1f} | {f_bw:.0f} ({100 * f_bw / c:.0f}%) |")
    if args.tune:
        res["tune"] = tune(la, Ts)
        save()
    print("# compiled kernels:")
    try:
        res["kernels"] = kernel_report()
    except Exception as e:  # noqa: BLE001  (introspection only)
        print(f"  kernel report unavailable: {e}")
    save()
    print(json.dumps(res, default=float))


if __name__ == "__main__":
    main()
