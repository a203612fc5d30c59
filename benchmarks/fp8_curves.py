"""FP8 vs bf16 training loss curves from the same seed (issue 13: "fp8 final loss within 1% of bf16 at 300 steps").

Two `ringlinear train` runs in this process, identical but for `--precision` (bf16: bf16 parameters with fp32
master weights; fp8: the same plus the recipe of docs/fp8.md), on the same data, tokenizer (trained once, by the
first run) and init. Prints the loss every tenth of the run, the final losses (mean of the last 10% of steps, to
average out batch-to-batch noise), their relative difference and the validation losses; writes
`fp8_loss_curves.png` and a final JSON line.

    PYTHONPATH=. python benchmarks/fp8_curves.py                       # GPU: `small` preset, 300 steps
    PYTHONPATH=. python benchmarks/fp8_curves.py --quick --device cpu  # CPU smoke: tiny-fp8, 20 steps, emulated FP8
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from ringlinear.train import train
from ringlinear.train.config import get_train_preset
from ringlinear.train.report import read_metrics


def losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r}


def tail_mean(curve, frac=0.1):
    steps = sorted(curve)
    tail = steps[-max(1, int(len(steps) * frac)):]
    return sum(curve[s] for s in tail) / len(tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-preset", default="small", help="a model preset whose dimensions tile by 128")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp8-experts", action="store_true", help="the experts in FP8 too")
    ap.add_argument("--out", default=None, help="where the two runs go (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="tiny-fp8, 20 steps (a smoke run of the script)")
    args = ap.parse_args()
    if args.quick:
        args.model_preset, args.steps, args.seq_len, args.batch_size = "tiny-fp8", 20, 64, 4
    cpu = args.device == "cpu"
    root = args.out or tempfile.mkdtemp(prefix="fp8_curves_")
    base = get_train_preset("tiny-code").replace(
        model_preset=args.model_preset, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=max(1, args.steps // 20), eval_every=0, eval_rows=32, save_every=0,
        device=args.device, progress=False, plot=False, bpe_sample_mb=1.0 if args.quick else 8.0,
        vocab_size=384 if args.quick else 4096, overwrite=True)
    runs, t = {}, {}
    for prec in ("bf16", "fp8"):
        out = os.path.join(root, prec)
        cfg = base.replace(out=out, precision=prec)
        if prec == "fp8":
            cfg = cfg.replace(tokenizer=os.path.join(root, "bf16", "tokenizer"), fp8_experts=args.fp8_experts,
                              fp8_emulate=cpu)
        t0 = time.perf_counter()
        runs[prec] = (train(cfg), losses(out))
        t[prec] = time.perf_counter() - t0
    (sb, cb), (sf, cf) = runs["bf16"], runs["fp8"]
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n{args.model_preset}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, {card}")
    print("| step | bf16 loss | fp8 loss | fp8 / bf16 - 1 |")
    print("|---|---|---|---|")
    for s in sorted(cb)[max(1, len(cb) // 10) - 1::max(1, len(cb) // 10)]:
        print(f"| {s} | {cb[s]:.4f} | {cf[s]:.4f} | {cf[s] / cb[s] - 1:+.2%} |")
    fb, ff = tail_mean(cb), tail_mean(cf)
    rel = ff / fb - 1
    print(f"final (mean of the last 10% of steps): bf16 {fb:.4f}, fp8 {ff:.4f} ({rel:+.2%}; target within 1%); "
          f"val bf16 {sb['val_loss_end']:.4f}, fp8 {sf['val_loss_end']:.4f}; wall bf16 {t['bf16']:.0f} s, "
          f"fp8 {t['fp8']:.0f} s")
    png = os.path.join(root, "fp8_loss_curves.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, c in (("bf16", cb), ("fp8", cf)):
            ax.plot(sorted(c), [c[s] for s in sorted(c)], label=name, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{args.model_preset}: FP8 vs bf16, same seed ({card})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        print(f"plot: {png}")
    except ImportError:
        png = None
        print("matplotlib is not installed: no plot")
    print(json.dumps({"bench": "fp8_curves", "card": card, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                      "final_loss": {"bf16": fb, "fp8": ff}, "rel_diff": rel, "within_1pct": abs(rel) <= 0.01,
                      "val_loss_end": {"bf16": sb["val_loss_end"], "fp8": sf["val_loss_end"]},
                      "wall_s": t, "plot": png, "curves": {"bf16": cb, "fp8": cf}}))


if __name__ == "__main__":
    main()
