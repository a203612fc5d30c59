"""FP8 GEMMs at decode and short-prefill shapes, same inputs, same process: (1) the grouped expert GEMMs (gate/up
then down, ops/fp8/triton_gemm.py) with each tile tier forced in turn; (2) dense projections: our Triton GEMM (the
one-expert plan) against torch's blockwise scaled_mm (cuBLASLt) and the bf16 GEMM of the same weights.

Tiers: the 128-row tile of 8 warps (`CFG`, what the training GEMMs use) and 64-row tiles of 4 or 8 warps
(`SMALL_CFG` is the 8-warp one, chosen below LARGE_ROWS_PER_EXPERT rows per expert). Routing: random top-8 of 256
experts. Time: one CUDA graph of 20 calls, replayed 5 times after a warm replay; GB/s = FP8 bytes of the experts
the batch touches / time (the bandwidth a decode step needs from these GEMMs). Every tier's output is compared
bitwise with the 128-row tile's. Dense: the linear-attention layers' query_key_value (N = 3h) and an h x h
projection of each shape at M = 32 and 64 rows; GB/s = weight bytes / time (FP8 1 byte, bf16 2); our GEMM's
relative difference to cuBLAS's is printed (the same products, different summation). Prints tables and a final
JSON line.

    PYTHONPATH=. python benchmarks/fp8_decode.py                 # one GPU (its grouped half took 27 s on an H200)
    PYTHONPATH=. python benchmarks/fp8_decode.py --device cpu    # toy sizes on the Triton interpreter: checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

def weights(E, n, k, dev, TQ, R, w=None):
    """Random (or the given) [E, n, k] weights quantised to (codes, scales, transposed codes, transposed scales)."""
    w = torch.randn(E, n, k, device=dev) * k ** -0.5 if w is None else w
    out = (torch.empty(E, n, k, dtype=R.E4M3, device=dev), torch.empty(E, n // 128, k // 128, device=dev),
           torch.empty(E, k, n, dtype=R.E4M3, device=dev), torch.empty(E, k // 128, n // 128, device=dev))
    TQ.quantize_weight_into(w, *out, False, torch.zeros(1, dtype=torch.int64, device=dev))
    return out


def time_us(f, dev, calls=20, replays=5) -> float:
    if dev.type != "cuda":  # the interpreter: one call, not a timing
        t = time.perf_counter()
        f()
        return (time.perf_counter() - t) * 1e6
    f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            f()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(replays):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (calls * replays) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are imported
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the interpreter smoke run)")
    from ringlinear.ops.fp8 import reference as R
    from ringlinear.ops.fp8 import triton_gemm as TG
    from ringlinear.ops.fp8 import triton_quant as TQ
    from ringlinear.ops.moe.triton_route import make_plan

    tiers = {"128 rows, 8 warps": TG.CFG, "64 rows, 4 warps": dict(TG.SMALL_CFG, num_warps=4),
             "64 rows, 8 warps": TG.SMALL_CFG}
    toy = dev.type == "cpu"
    shapes = [("toy", 8, 2, 256, 128, (8,))] if toy else \
        [("Ring-mini", 256, 8, 2048, 512, (32, 64, 256)), ("Ring-flash", 256, 8, 4096, 1024, (32, 64, 256))]
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    res = {"card": card, "date": time.strftime("%Y-%m-%d"), "points": []}
    print(f"{card}\n{'shape':<11}{'tokens':>7}  {'tier':<18}{'us':>9}{'GB/s':>8}  bitwise vs 128-row")
    for name, E, k, H, inter, token_counts in shapes:
        w13, w2 = weights(E, 2 * inter, H, dev, TQ, R), weights(E, H, inter, dev, TQ, R)
        for T in token_counts:
            x = torch.randn(T, H, device=dev).to(torch.bfloat16)
            idx = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)])
            pair, eoff = make_plan(idx, E)
            cnt = torch.zeros(1, dtype=torch.int64, device=dev)
            (xq, xs), _ = TQ.quantize(x, R.E4M3, False, cnt)
            touched = idx.unique().numel() * 3 * inter * H   # FP8 bytes of the experts this batch reads
            first = None
            for tier, cfg in tiers.items():
                def f(cfg=cfg):
                    _, (hq, hs), _ = TG.gateup(xq, xs, w13[0], w13[1], pair, eoff, k, torch.bfloat16, False, False,
                                               cnt, cfg=cfg)
                    o = torch.empty(T * k, H, dtype=torch.bfloat16, device=dev)
                    return TG.rows_gemm(hq, hs, w2[0], w2[1], pair, eoff, k, o, a_gather=False, cfg=cfg)
                out = f()
                first = out if first is None else first
                us = time_us(f, dev)
                p = {"shape": name, "tokens": T, "tier": tier, "us": us, "GBps": touched / us / 1e3,
                     "bitwise": bool(torch.equal(out, first)), "default": cfg == TG._cfg(T * k, E, True)}
                res["points"].append(p)
                print(f"{name:<11}{T:>7}  {tier:<18}{us:>9.1f}{p['GBps']:>8.0f}  {p['bitwise']}"
                      f"{'   (the default)' if p['default'] else ''}", flush=True)
    res["dense"] = dense_section(dev, toy, TG, TQ, R)
    print(json.dumps(res))


def dense_section(dev, toy, TG, TQ, R):
    """Dense projections at decode row counts: Triton (one-expert plan) vs cuBLASLt scaled_mm vs bf16."""
    from ringlinear.ops.fp8 import torch_mm
    shapes = [("toy", 256, 512, (8,))] if toy else \
        [("Ring-mini", 2048, 6144, (32, 64)), ("Ring-mini", 2048, 2048, (32, 64)),
         ("Ring-flash", 4096, 12288, (32, 64)), ("Ring-flash", 4096, 4096, (32, 64))]
    cnt = torch.zeros(1, dtype=torch.int64, device=dev)
    out = []
    print(f"\n{'shape':<11}{'K':>6}{'N':>7}{'M':>5}  {'Triton us':>10}{'cuBLAS us':>10}{'bf16 us':>9}  "
          f"{'Triton GB/s':>11}{'cuBLAS GB/s':>12}{'bf16 GB/s':>10}  rel diff")
    for name, K, N, ms in shapes:
        w = torch.randn(N, K, device=dev) * K ** -0.5
        wq, ws, _, _ = weights(1, N, K, dev, TQ, R, w[None])   # the bf16 GEMM below reads the same weights
        wq, ws = wq[0], ws[0]
        wb = w.to(torch.bfloat16)
        for M in ms:
            x = torch.randn(M, K, device=dev).to(torch.bfloat16)
            (xq, xs), _ = TQ.quantize(x, R.E4M3, False, cnt)
            pair, eoff = TG.identity_plan(M, dev)

            def tri():
                o = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
                return TG.rows_gemm(xq, xs, wq[None], ws[None], pair, eoff, 1, o, a_gather=False)
            t_us = time_us(tri, dev)
            p = {"shape": name, "K": K, "N": N, "M": M, "triton_us": t_us, "triton_GBps": N * K / t_us / 1e3}
            if dev.type == "cuda":
                def cub():
                    return torch_mm.fprop(xq, xs, wq, ws, torch.bfloat16)
                c_us, b_us = time_us(cub, dev), time_us(lambda: torch.nn.functional.linear(x, wb), dev)
                a, b = tri().double(), cub().double()
                p.update(cublas_us=c_us, cublas_GBps=N * K / c_us / 1e3, bf16_us=b_us, bf16_GBps=2 * N * K / b_us / 1e3,
                         rel_diff=((a - b).norm() / b.norm()).item())
            out.append(p)
            print(f"{name:<11}{K:>6}{N:>7}{M:>5}  {t_us:>10.1f}{p.get('cublas_us', float('nan')):>10.1f}"
                  f"{p.get('bf16_us', float('nan')):>9.1f}  {p['triton_GBps']:>11.0f}"
                  f"{p.get('cublas_GBps', float('nan')):>12.0f}{p.get('bf16_GBps', float('nan')):>10.0f}  "
                  f"{p.get('rel_diff', float('nan')):.1e}", flush=True)
    return out


if __name__ == "__main__":
    main()
