"""Paged GQA decode attention: correctness vs an fp64 gather reference, and KV read bandwidth, on one GPU.

Ring-mini softmax-layer shape: 16 query heads, 4 kv heads, head_dim 128, bf16 KV in blocks of 16, scattered blocks.
Prints a table and a final JSON line. Run: PYTHONPATH=. python benchmarks/paged_attention.py
"""
from __future__ import annotations

import json

import torch

from ringlinear.ops.attention import reference as R
from ringlinear.ops.attention.triton import paged_decode_attention


def setup(B, C, H=16, KV=4, D=128, bs=16, dev="cuda", seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    nb = B * (-(-C // bs))
    K = torch.randn(nb * bs, KV, D, device=dev, generator=g, dtype=torch.bfloat16)
    V = torch.randn(nb * bs, KV, D, device=dev, generator=g, dtype=torch.bfloat16)
    perm = torch.randperm(nb, device=dev, generator=g)
    tables = perm.view(B, -1).to(torch.int32)
    lens = torch.full((B,), C, dtype=torch.int32, device=dev)
    lens[0] = max(1, C - 7)  # one ragged length
    q = torch.randn(B, H, D, device=dev, generator=g, dtype=torch.bfloat16)
    return q, K, V, tables, lens, bs


def main():
    card = torch.cuda.get_device_name()
    rows, res = [], {"card": card}
    # correctness
    q, K, V, bt, cl, bs = setup(4, 3000)
    ref = R.paged_decode_attention(q[:2].double().cpu(), K.double().cpu(), V.double().cpu(), bt[:2].cpu(),
                                   cl[:2].cpu(), bs, 128 ** -0.5)
    out = paged_decode_attention(q, K, V, bt, cl, bs, 128 ** -0.5)
    err = ((out[:2].double().cpu() - ref).norm() / ref.norm()).item()
    alone = paged_decode_attention(q[1:2], K, V, bt[1:2], cl[1:2], bs, 128 ** -0.5)
    res["rel_err_vs_fp64"] = err
    res["batch_invariant"] = bool(torch.equal(alone[0], out[1]))
    for B, C in ((1, 4096), (64, 4096), (64, 32768), (16, 65536)):
        q, K, V, bt, cl, bs = setup(B, C)
        f = lambda: paged_decode_attention(q, K, V, bt, cl, bs, 128 ** -0.5)  # noqa: E731
        for _ in range(3):
            f()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        ts = []
        for _ in range(30):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        t = sorted(ts)[len(ts) // 2] * 1e-3
        byts = 2 * int(cl.sum()) * 4 * 128 * 2
        rows.append({"batch": B, "context": C, "us": t * 1e6, "GBps": byts / t / 1e9})
    res["points"] = rows
    print(f"paged decode attention on {card}: rel err vs fp64 {err:.2e}, batch invariant {res['batch_invariant']}")
    print(f"{'batch':>6}{'context':>9}{'us (graph)':>12}{'KV GB/s':>10}")
    for r in rows:
        print(f"{r['batch']:>6}{r['context']:>9}{r['us']:>12.1f}{r['GBps']:>10.0f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
