#!/usr/bin/env python3
"""Training step at the published shapes on one CUDA GPU: tokens/s, MFU, peak memory and a per-part time split, with
the same model through the reference (plain PyTorch) ops as the baseline, in the same process.

Configurations: (a) a 5-layer slice of Ring-mini-linear-2.0 (layers 0-4: dense layer, 3 linear + 1 softmax
attention, 4 MoE layers of 256 experts top-8) at seq 4K and 16K; (b) a 4-layer Ring-flash-linear-2.0 slice (hidden
4096) at 4K. bf16 parameters with fp32 master weights and moments (MasterAdamW), the fused kernels, the fused
linear + cross-entropy; the step is `ringlinear.train.step` (what `ringlinear train` runs). Random tokens packed
into rows of documents whose lengths are drawn uniformly from [seq/8, seq] (cu_seqlens; nothing crosses a
document).

FLOPs per token (forward + backward = 3x forward; stated in the output):
  6 * (matmul parameters a token uses: attention projections, dense MLP or shared + top-k experts, router,
       LM head; not the embedding)
  + softmax attention: 3 * 4 * H * D * mean keys seen (causal: (L + 1) / 2 per document of length L)
  + lightning attention: 3 * H * (4 * C * D + 4 * D * D) with C = 64 (intra-chunk products and state update)
MFU = achieved FLOP/s / peak, against the measured bf16 GEMM rate (8192^3 on this card) and the datasheet
989 TFLOP/s (H100/H200 SXM dense bf16).

The flash slice has ~11B parameters: bf16 weights + gradients + fp32 master and moments (16 B/param) exceed one
H200, so it is timed forward + backward only (the optimizer step stated apart, per parameter, from the mini slice).
Part split: each part timed alone at the step's shapes (forward + backward on the model's own modules); "other" =
step - sum of parts.

Run: PYTHONPATH=. python benchmarks/train_step.py [--quick] [--max-layers]; prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from types import SimpleNamespace

import torch

from ringlinear.models.presets import get_preset
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.train import step as S
from ringlinear.train.balance import MoEBalancer
from ringlinear.train.dist import DistEnv
from ringlinear.train.optim import make_optimizer

DATASHEET_TFLOPS = 989.0


def timed(fn, warmup=2, rep=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(rep):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / rep


def gemm_peak():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    s = timed(lambda: a @ b, 3, 10)
    return 2 * 8192 ** 3 / s / 1e12


def doc_lengths(total, seq, seed):
    g = torch.Generator().manual_seed(seed)
    out, left = [], total
    while left > 0:
        n = int(torch.randint(max(1, seq // 8), seq + 1, (1,), generator=g))
        out.append(min(n, left))
        left -= out[-1]
    return out


def make_batch(cfg, tokens, seq, seed):
    lens = doc_lengths(tokens, seq, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=g)
    labels = torch.roll(ids, -1, 1)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    labels[0, cu[1:] - 1] = -100  # a document's last token has no target inside it
    rows = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return {"input_ids": ids.cuda(), "labels": labels.cuda(), "cu_seqlens": cu.cuda(), "max_seqlen": max(lens),
            "row_ids": rows.cuda(), "n_rows": len(lens), "n_targets": int((labels != -100).sum()), "lens": lens}


def flops_per_token(cfg, lens):
    h, H, D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim_
    KV = cfg.num_key_value_heads
    mat = cfg.vocab_size * h  # LM head
    n_soft = n_lin = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_softmax_layer(i):
            mat += h * (H + 2 * KV) * D + H * D * h
            n_soft += 1
        else:
            mat += h * 3 * H * D + 2 * H * D * h
            n_lin += 1
        if cfg.is_moe_layer(i):
            mat += cfg.num_experts * h + 3 * h * cfg.moe_intermediate_size * cfg.num_experts_per_tok
            mat += 3 * h * cfg.shared_intermediate_size
        else:
            mat += 3 * h * cfg.intermediate_size
    tok = sum(lens)
    mean_keys = sum(L * (L + 1) / 2 for L in lens) / tok
    attn = n_soft * 3 * 4 * H * D * mean_keys
    lin = n_lin * 3 * H * (4 * 64 * D + 4 * D * D)
    return 6 * mat + attn + lin, {"matmul_params_per_token": mat, "attention_flops": attn, "linear_attn_flops": lin}


def build(cfg, seed=0):
    return RingLinearForCausalLM.from_config(cfg, dtype=torch.bfloat16, device="cuda", seed=seed).train()


def trainer_like(model, cfg, rows, seq, optimizer=True, fp8=False):
    env = DistEnv(0, 1, 0, torch.device("cuda"), False)
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8, "cuda") if optimizer else None
    if fp8:  # what `ringlinear train --precision fp8` does after building the optimizer
        from ringlinear.models.fp8 import convert_to_fp8
        from ringlinear.ops.fp8 import Fp8Recipe
        convert_to_fp8(model, Fp8Recipe(), optimizer=opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0) if optimizer else None
    return SimpleNamespace(model=model, fwd=model, ddp=None, ep=None, cp=None, env=env, opt=opt, lr_sched=sched,
                           balancer=MoEBalancer(model, 1e-3, 0.0), autocast=contextlib.nullcontext,
                           sched_rows=SimpleNamespace(global_rows=rows), cfg=SimpleNamespace(seq_len=seq, grad_clip=1.0))


def run_step(tr, batch, optimizer=True):
    S.forward_backward(tr, [batch])
    if optimizer:
        S.optimizer_step(tr)
    else:
        for p in tr.model.parameters():
            p.grad = None
        tr.balancer.step()


def parts(model, batch, cfg):
    """Forward + backward time of each part alone at the step's shapes (seconds)."""
    T, h = batch["input_ids"].shape[1], cfg.hidden_size
    x = torch.randn(T, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    from ringlinear.models.context import StatelessContext
    ctx = StatelessContext(batch["cu_seqlens"], max_seqlen=batch["max_seqlen"], total=T)
    cos, sin = model.model.rotary_emb(ctx.positions)
    layers = model.model.layers
    lin = next(l for l in layers if not l.is_softmax)
    soft = next((l for l in layers if l.is_softmax), None)
    moe = next(l for l in layers if hasattr(l.mlp, "w13"))

    def fb(fn):
        def run():
            y = fn()
            y.backward(torch.ones_like(y))
        return timed(run, 1, 3)
    n_lin = sum(not l.is_softmax for l in layers)
    n_soft = len(layers) - n_lin
    n_moe = sum(hasattr(l.mlp, "w13") for l in layers)
    # (time of one, how many the step has)
    out = {"linear_attention": (fb(lambda: lin.attention(x, cos, sin, ctx)), n_lin),
           "moe": (fb(lambda: moe.mlp(x)), n_moe)}
    if soft is not None:
        out["softmax_attention"] = (fb(lambda: soft.attention(x, cos, sin, ctx)), n_soft)
    from ringlinear.ops.loss import linear_cross_entropy
    lab = batch["labels"][0]
    out["lm_head_loss"] = (fb(lambda: linear_cross_entropy(x, model.lm_head.weight, lab, reduction="sum")), 1)
    return out


def bench_config(name, cfg, seq, rows, ref_baseline, optimizer=True, numerics="default", fp8=False):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build(cfg).set_numerics(numerics)
    init_s = time.perf_counter() - t0
    batch = make_batch(cfg, rows * seq, seq, seed=1)
    tr = trainer_like(model, cfg, rows, seq, optimizer, fp8)
    step_s = timed(lambda: run_step(tr, batch, optimizer), 2, 4)
    peak = torch.cuda.max_memory_allocated() / 2**30
    fpt, detail = flops_per_token(cfg, batch["lens"])
    tokens = rows * seq
    res = {"name": name, "seq": seq, "tokens_per_step": tokens, "optimizer": optimizer, "init_s": init_s,
           "step_ms": 1e3 * step_s, "tok_s": tokens / step_s, "tflops": fpt * tokens / step_s / 1e12,
           "flops_per_token": fpt, **detail, "peak_gib": peak,
           "params": sum(p.numel() for p in model.parameters())}
    try:
        pt = {k: (1e3 * t * n) for k, (t, n) in parts(model, batch, cfg).items()}  # ms per step, all layers
        if optimizer:
            for p in model.parameters():  # a gradient to step on (the step above consumed its own)
                p.grad = torch.zeros_like(p)
            pt["optimizer"] = 1e3 * timed(lambda: tr.opt.step(), 1, 3)
        pt["other (dense MLP, norms, embedding, glue)"] = res["step_ms"] - sum(pt.values())
        res["parts_ms"] = pt
    except Exception as e:  # noqa: BLE001
        res["parts_ms"] = {"error": f"{type(e).__name__}: {e}"}
    if ref_baseline:  # one row (the reference's fp32 logits and per-document loops need far more memory)
        small = make_batch(cfg, seq, seq, seed=2)
        tr.sched_rows.global_rows = 1
        ours_1 = timed(lambda: run_step(tr, small, optimizer), 1, 3)
        os.environ["RINGLINEAR_BACKEND"] = "torch"
        try:
            ref_s = timed(lambda: run_step(tr, small, optimizer), 1, 1)
            res["reference_ops_1row"] = {"tokens": seq, "ours_ms": 1e3 * ours_1, "reference_ms": 1e3 * ref_s}
            res["speedup_vs_reference"] = ref_s / ours_1
        except Exception as e:  # noqa: BLE001
            res["reference_ops_1row"] = f"error: {type(e).__name__}: {e}"
        finally:
            os.environ.pop("RINGLINEAR_BACKEND")
    return res


def max_layers(lo=5, hi=12):
    """Largest Ring-mini slice whose training step (bf16 + fp32 master AdamW, 8K tokens) fits, by trying."""
    best = None
    for L in range(lo, hi + 1):
        try:
            torch.cuda.empty_cache()
            cfg = get_preset("ring-mini-linear-2.0").replace(num_hidden_layers=L)
            m = build(cfg)
            tr = trainer_like(m, cfg, 2, 4096)
            run_step(tr, make_batch(cfg, 8192, 4096, 2))
            torch.cuda.synchronize()
            best = (L, torch.cuda.max_memory_allocated() / 2**30)
            del tr, m
        except torch.OutOfMemoryError:
            break
    return {"largest_layers": best[0] if best else None, "peak_gib": best[1] if best else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-layers", action="store_true", help="also find the largest Ring-mini slice that trains")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--aligned", action="store_true", help="also the mini 4K step in numerics=aligned (its price)")
    ap.add_argument("--fp8", action="store_true", help="also the mini 4K and flash steps with --precision fp8")
    ap.add_argument("--only", default="", help="comma-separated config names to run (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/train_step.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    peak = gemm_peak()
    mini = get_preset("ring-mini-linear-2.0").replace(num_hidden_layers=5)
    # 4 flash layers with the published group size (8) would all be softmax (the HF tail rule): group size 4
    # gives the slice 3 linear + 1 softmax layers, like the model's groups.
    flash = get_preset("ring-flash-linear-2.0").replace(num_hidden_layers=4, layer_group_size=4)
    r4 = 4 if args.quick else 8
    runs = [("mini-5L seq4K", mini, 4096, r4, not args.no_reference, True, "default", False),
            ("mini-5L seq16K", mini, 16384, r4 // 4, False, True, "default", False),
            ("flash-4L seq4K (fwd+bwd)", flash, 4096, r4 // 2, False, False, "default", False)]
    if args.aligned:
        runs.append(("mini-5L seq4K aligned", mini, 4096, r4, False, True, "aligned", False))
    if args.fp8:
        runs += [("mini-5L seq4K fp8", mini, 4096, r4, False, True, "default", True),
                 ("flash-4L seq4K fp8 (fwd+bwd)", flash, 4096, r4 // 2, False, False, "default", True)]
    if args.only:
        runs = [r for r in runs if any(o in r[0] for o in args.only.split(","))]
    results = {"card": card, "torch": torch.__version__, "bf16_gemm_tflops": peak, "configs": []}
    for name, cfg, seq, rows, ref, opt, numerics, fp8 in runs:
        try:
            r = bench_config(name, cfg, seq, rows, ref, opt, numerics, fp8)
            r["mfu_measured_peak"] = r["tflops"] / peak
            r["mfu_datasheet"] = r["tflops"] / DATASHEET_TFLOPS
        except Exception as e:  # noqa: BLE001  (report and go on)
            traceback.print_exc()
            r = {"name": name, "error": f"{type(e).__name__}: {e}"}
        results["configs"].append(r)
        print(json.dumps(r), flush=True)
    if args.max_layers:
        try:
            results["max_layers"] = max_layers()
        except Exception as e:  # noqa: BLE001
            results["max_layers"] = {"error": f"{type(e).__name__}: {e}"}
    print(f"\n{card}: training step, bf16 params + fp32 master AdamW (bf16 GEMM peak measured {peak:.0f} TFLOP/s)")
    print(f"{'config':26s} {'tok/step':>8s} {'ms':>8s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU(meas)':>9s} "
          f"{'MFU(989)':>8s} {'peak GiB':>8s} {'vs ref':>7s}")
    for r in results["configs"]:
        if "error" in r:
            print(f"{r['name']:26s} error: {r['error'][:80]}")
            continue
        sp = r.get("speedup_vs_reference")
        print(f"{r['name']:26s} {r['tokens_per_step']:8d} {r['step_ms']:8.1f} {r['tok_s']:9.0f} {r['tflops']:8.1f} "
              f"{r['mfu_measured_peak']:9.1%} {r['mfu_datasheet']:8.1%} {r['peak_gib']:8.1f} "
              f"{'-' if sp is None else f'{sp:.1f}x':>7}")
        print("   parts (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in r["parts_ms"].items()
                                            if isinstance(v, float)))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_step.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
