#!/usr/bin/env python3
"""Training-path ops on one CUDA GPU, each against its baseline in the same process:

- LM head + loss: fused linear cross-entropy (fp32 logits by chunks, no [tokens, vocab] tensor) vs the eager
  fp32-logits path (lm_head kernel + F.cross_entropy) and liger-kernel's fused linear cross-entropy (if importable;
  it computes bf16 logits): forward + backward ms, peak extra memory, loss/grad error vs an fp64-free fp32 reference.
- RMSNorm: Triton forward + backward vs eager PyTorch.
- AdamW with fp32 master weights (fused Triton) vs torch's fused AdamW on fp32 parameters (what bf16 training with
  master weights would otherwise run), bytes per parameter and effective bandwidth.
- packed causal attention: flash varlen (torch) vs the per-document SDPA loop.

Run: PYTHONPATH=. python benchmarks/train_ops.py [--quick]; prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F


def ms(fn, warmup=5, rep=20):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


def peak_extra(fn):
    """Peak memory above the current allocation while fn runs (GiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_loss(N, h, V, rows):
    from ringlinear.ops.lm_head import lm_head_fp32
    from ringlinear.ops.loss.triton import linear_cross_entropy
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(N, h, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, h, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::11] = -100

    def eager():
        loss = F.cross_entropy(lm_head_fp32(x, w), t, ignore_index=-100, reduction="sum")
        loss.backward()
        return loss

    def fused():
        loss = linear_cross_entropy(x, w, t, reduction="sum")
        loss.backward()
        return loss

    res = {}
    x.grad = w.grad = None
    l_ref = eager()
    gx_ref, gw_ref = x.grad.clone(), w.grad.clone()
    for name, fn in (("eager_fp32_logits", eager), ("fused", fused)):
        x.grad = w.grad = None
        loss = fn()
        res[name] = {"ms": ms(lambda: (fn(), setattr(x, "grad", None), setattr(w, "grad", None)), rep=10),
                     "peak_gib": peak_extra(fn), "loss_rel": rel(loss, l_ref), "dx_rel": rel(x.grad, gx_ref),
                     "dw_rel": rel(w.grad, gw_ref)}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger():
            loss = liger_fused_linear_cross_entropy(x, w, t, reduction="sum")
            loss.backward()
            return loss
        x.grad = w.grad = None
        loss = liger()
        res["liger_bf16_logits"] = {"ms": ms(lambda: (liger(), setattr(x, "grad", None), setattr(w, "grad", None)),
                                             rep=10), "peak_gib": peak_extra(liger), "loss_rel": rel(loss, l_ref),
                                    "dx_rel": rel(x.grad, gx_ref), "dw_rel": rel(w.grad, gw_ref)}
    except Exception as e:  # noqa: BLE001  (the anchor is optional: say why it is missing)
        res["liger_bf16_logits"] = {"error": f"{type(e).__name__}: {e}"}
    flops = 3 * 2 * N * h * V
    for r in res.values():
        if "ms" in r:
            r["tflops"] = flops / r["ms"] / 1e9
    return res


def bench_rmsnorm(M, C):
    from ringlinear.ops.norm.reference import rms_norm as ref
    from ringlinear.ops.norm.triton_rms import rms_norm
    x = torch.randn(M, C, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.ones(C, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, f in (("eager", ref), ("triton", rms_norm)):
        out[name] = ms(lambda: torch.autograd.grad(f(x, w, 1e-6), (x, w), dy))
    y, yr = rms_norm(x, w, 1e-6), ref(x, w, 1e-6)
    out["rel_err"] = rel(y, yr)
    return out


def bench_adamw(n):
    from ringlinear.ops.optim.triton import adamw_step
    p = torch.randn(n, device="cuda").to(torch.bfloat16)
    gr = torch.randn(n, device="cuda").to(torch.bfloat16)
    master, m, v = p.float(), torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    kw = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    t_ours = ms(lambda: adamw_step(p, gr, master, m, v, **kw))
    fp = torch.nn.Parameter(torch.randn(n, device="cuda"))
    fp.grad = torch.randn(n, device="cuda")
    opt = torch.optim.AdamW([fp], lr=1e-4, fused=True)
    t_torch = ms(lambda: (fp.grad.copy_(gr), opt.step(), p.copy_(fp.detach())))
    return {"params": n, "master_adamw_ms": t_ours, "torch_fused_fp32_plus_casts_ms": t_torch,
            "master_adamw_TBps": 28 * n / t_ours / 1e9}


def bench_attention(T, ndocs, H, KV, D):
    from ringlinear.ops.attention.flash_varlen import varlen_causal
    from ringlinear.ops.attention.reference import causal_attention_varlen
    g = torch.Generator(device="cuda").manual_seed(1)
    cuts = sorted(torch.randperm(T - 1, generator=torch.Generator().manual_seed(2))[:ndocs - 1].add(1).tolist())
    cu = torch.tensor([0] + cuts + [T], dtype=torch.int32, device="cuda")
    mx = int((cu[1:] - cu[:-1]).max())
    q, k, v = (torch.randn(T, h, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_() for h in (H, KV, KV))
    do = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    t_flash = ms(lambda: torch.autograd.grad(varlen_causal(q, k, v, cu, D ** -0.5, mx), (q, k, v), do))
    t_loop = ms(lambda: torch.autograd.grad(causal_attention_varlen(q, k, v, cu.cpu(), D ** -0.5), (q, k, v), do),
                warmup=1, rep=3)
    return {"tokens": T, "docs": ndocs, "flash_varlen_fwd_bwd_ms": t_flash, "reference_loop_fwd_bwd_ms": t_loop}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/train_ops.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    N = 4096 if args.quick else 8192
    results = {"card": card, "torch": torch.__version__}
    sections = {
        "loss_mini": lambda: bench_loss(N, 2048, 157184, 4096),
        "loss_flash": lambda: bench_loss(N, 4096, 157184, 4096),
        "rmsnorm": lambda: bench_rmsnorm(N * 2, 2048),
        "adamw_1b": lambda: bench_adamw(1 << 30 if not args.quick else 1 << 28),
        "attention": lambda: bench_attention(N, 8, 16, 4, 128),
    }
    for name, fn in sections.items():
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001  (one failing section must not hide the others)
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        torch.cuda.empty_cache()
    print(f"\n{card}: LM head + loss at {N} tokens, vocab 157184 (fwd+bwd)")
    print(f"{'variant':24s} {'hidden':>6s} {'ms':>8s} {'TFLOP/s':>8s} {'peak GiB':>9s} {'dx rel':>8s}")
    for sec, h in (("loss_mini", 2048), ("loss_flash", 4096)):
        for k, r in results[sec].items() if isinstance(results[sec], dict) else ():
            if isinstance(r, dict) and "ms" in r:
                print(f"{k:24s} {h:6d} {r['ms']:8.2f} {r['tflops']:8.1f} {r['peak_gib']:9.2f} {r['dx_rel']:8.1e}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_ops.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
