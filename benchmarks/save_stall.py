#!/usr/bin/env python3
"""Step-time spike at checkpoint steps on one CUDA GPU: a synchronous save, `--async-save` with the plain pageable
host copy, and `--async-save` with the staged copy (pinned buffers, side stream: ringlinear/train/staging.py)
straight to the host (async-staged-host) and through a device copy where it fits (async-staged, the default).

The project's own Trainer (what `ringlinear train` builds: bf16 parameters, fp32 master AdamW, the fused step) on a
slice of Ring-mini-linear-2.0 (default 2 layers: the dense layer 0 and one MoE layer of 256 experts), random init,
the embedded stdlib corpus; the vocabulary is the trained BPE's (--vocab-size), not Ring-mini's 157K. Every step
is timed alone: forward, backward, optimizer, the save at save steps (as the loop calls it), then a sync of the
training stream only (the staged copy runs on its own stream; the next optimizer step waits for its fenced part,
so a fenced copy longer than forward + backward shows in the step after the save). spike = step / median of the steps with no save
and not right after one - 1. snapshot = the host copy's time (pageable) or the staged copy's device time. The staged
modes allocate and page-lock their host buffers at the first optimizer step (in the untimed warm-up).
Before a save step the previous save's writer is waited for outside the timed step (`writer_waits_s`): a real run
saves every few hundred steps, long after the last write ended, and that wait is the disk's, not the snapshot's.
The corpus is cut to 16 MB (the data only feeds the steps).

Checkpoints go to a temp directory removed at the end, keep_last=1 (two on disk while one replaces the other).
Run: PYTHONPATH=. python benchmarks/save_stall.py [--layers 2] [--steps 16] [--save-every 5]
     PYTHONPATH=. python benchmarks/save_stall.py --device cpu   (a smoke run of the script: tiny-test, seconds)
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

from ringlinear.models.presets import get_preset
from ringlinear.train.config import get_train_preset
from ringlinear.train.staging import StagedCopy
from ringlinear.train.trainer import Trainer

MODES = ("sync", "async-pageable", "async-staged-host", "async-staged")


def build(args, root, mode, tokenizer):
    base = dict(out=os.path.join(root, mode), device=args.device, steps=args.steps + args.warmup, save_every=0,
                eval_every=0, keep_last=1, progress=False, plot=False, async_save=mode != "sync",
                seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=0, max_corpus_mb=16.0)
    if args.device == "cpu":
        cfg = get_train_preset("tiny-test").replace(threads=1, **base)
    else:
        mc = get_preset("ring-mini-linear-2.0").replace(num_hidden_layers=args.layers)
        path = os.path.join(root, "model_config.json")
        mc.to_json(path)
        cfg = get_train_preset("tiny-code").replace(model_config=path, vocab_size=args.vocab_size, **base)
    if tokenizer:
        cfg = cfg.replace(tokenizer=tokenizer)
    tr = Trainer(cfg)
    if mode == "async-pageable":
        tr.saver.stager = None  # AsyncSaver's plain host copy, the one `--async-save` made before staging
    elif mode == "async-staged-host":
        tr.saver.stager.device_copy = False  # straight to pinned memory: the next optimizer step waits for it
    return tr


def sync_stream(dev):
    if dev.type == "cuda":  # the training stream only: the staged copy is not waited for here
        torch.cuda.current_stream(dev).synchronize()


def run_mode(args, root, mode, tokenizer):
    tr = build(args, root, mode, tokenizer)
    dev = tr.env.device
    for s in range(args.warmup):  # kernels compiled, autotuned, optimizer state allocated
        tr.forward_backward(s)
        tr.optimizer_step()
        tr.step += 1
    sync_stream(dev)
    times, saves, writer_waits = [], [], []
    for i in range(args.steps):
        if (i + 1) % args.save_every == 0:  # a real run saves every few hundred steps, long after the last write
            t_w = time.perf_counter()  # ended: the wait for the previous writer is left out of the timed step
            tr.wait_for_save()
            sync_stream(dev)
            writer_waits.append(time.perf_counter() - t_w)
        t0 = time.perf_counter()
        tr.forward_backward(tr.step)
        tr.optimizer_step()
        tr.step += 1
        saved = (i + 1) % args.save_every == 0
        if saved:
            ts = time.perf_counter()
            tr.save()
            save_call = time.perf_counter() - ts
        sync_stream(dev)
        times.append(time.perf_counter() - t0)
        if saved:
            saves.append({"index": i, "step": tr.step, "save_call_s": save_call})
    t_wait = time.perf_counter()
    tr.wait_for_save()
    tail_wait = time.perf_counter() - t_wait
    snapshot_s = tr.saver.snapshot_s if tr.saver is not None else None  # the last save's
    fence_s = tr.saver.fence_s if tr.saver is not None and tr.saver.stager is not None else None
    device_copy = tr.saver.stager.last_device_copy if tr.saver is not None and tr.saver.stager else None
    quiet = [t for i, t in enumerate(times) if all(i not in (s["index"], s["index"] + 1) for s in saves)]
    med = statistics.median(quiet) if quiet else float("nan")
    for s in saves:
        i = s.pop("index")
        s.update(step_s=times[i], spike=times[i] / med - 1,
                 next_s=times[i + 1] if i + 1 < len(times) else None,
                 next_spike=times[i + 1] / med - 1 if i + 1 < len(times) else None)
    n_params = sum(p.numel() for p in tr.model.parameters())
    vocab = tr.model.config.vocab_size
    del tr
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    print(f"{mode}: median step {med:.3f} s, steps {' '.join(f'{t:.3f}' for t in times)}", flush=True)
    return {"median_step_s": med, "saves": saves, "writer_waits_s": writer_waits, "last_snapshot_s": snapshot_s,
            "last_fence_s": fence_s, "device_copy": device_copy,
            "final_wait_s": tail_wait,
            "params": n_params, "vocab": vocab}


def state_bytes(args) -> int:
    """bf16 parameters + fp32 master + two fp32 moments: 14 bytes per parameter (the vocabulary aside)."""
    from ringlinear.models.modeling import RingLinearForCausalLM
    mc = get_preset("ring-mini-linear-2.0").replace(num_hidden_layers=args.layers, vocab_size=args.vocab_size)
    with torch.device("meta"):
        n = sum(p.numel() for p in RingLinearForCausalLM(mc).parameters())
    return 14 * n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="leading layers of Ring-mini-linear-2.0")
    ap.add_argument("--steps", type=int, default=16, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the corpus")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dir", default=None, help="parent of the temp checkpoint directory (default: $TMPDIR)")
    ap.add_argument("--chunk-mb", type=int, default=0, help="host-copy chunk of the staged snapshot (default: "
                                                           "StagedCopy.CHUNK_BYTES, 256 MB)")
    args = ap.parse_args()
    if args.chunk_mb < 0:
        raise SystemExit("--chunk-mb must be >= 0")
    if args.chunk_mb:
        StagedCopy.CHUNK_BYTES = args.chunk_mb << 20
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu for the smoke mode")
    if args.device == "cpu":
        args.seq_len, args.batch_size, args.steps, args.save_every, args.warmup = 64, 4, 6, 3, 1
    root = tempfile.mkdtemp(prefix="save_stall-", dir=args.dir)
    try:
        if args.device == "cuda":
            need, free = 2 * state_bytes(args), shutil.disk_usage(root).free
            if need > free:
                raise SystemExit(f"two checkpoints of {args.layers} layers need ~{need / 1e9:.0f} GB, {root} has "
                                 f"{free / 1e9:.0f} GB free: lower --layers or pass --dir")
        res, tok = {}, None
        for m in modes:
            res[m] = run_mode(args, root, m, tok)
            tok = tok or os.path.join(root, m, "tokenizer")  # every mode on the same tokenizer
    finally:
        shutil.rmtree(root, ignore_errors=True)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    any_res = next(iter(res.values()))
    print(f"\n{card}: {args.layers if args.device == 'cuda' else 'tiny-test'} layers, {any_res['params'] / 1e9:.2f}B "
          f"params (vocab {any_res['vocab']}), {args.batch_size} x {args.seq_len} tokens/step, save every "
          f"{args.save_every}")
    print(f"{'mode':17s} {'median s':>9s} {'save step s':>12s} {'spike':>8s} {'next s':>8s} {'next spike':>11s} "
          f"{'save() s':>9s}")
    for m, r in res.items():
        for k, s in enumerate(r["saves"]):
            nxt = "-" if s["next_s"] is None else f"{s['next_s']:.3f}"
            nsp = "-" if s["next_spike"] is None else f"{s['next_spike']:+.1%}"
            med = f"{r['median_step_s']:9.3f}" if k == 0 else " " * 9
            print(f"{m if k == 0 else '':17s} {med} "
                  f"{s['step_s']:12.3f} {s['spike']:+8.1%} {nxt:>8s} {nsp:>11s} {s['save_call_s']:9.3f}")
        if r["last_snapshot_s"] is not None:
            fence = "" if r["last_fence_s"] is None else (f" (device copy {r['last_fence_s']:.3f} s)"
                                                          if r["device_copy"] else " (all of it fenced)")
            print(f"{'':17s} last snapshot {r['last_snapshot_s']:.3f} s{fence}, final wait for the writer "
                  f"{r['final_wait_s']:.3f} s")
    print("notes: the staged modes allocate and page-lock their host buffers (cudaHostRegister) at the first "
          "optimizer step, in the untimed warm-up, and every save reuses them; the writer thread (safetensors, "
          "sha256, torch.save) shares the GIL and the CPU with the training thread, which can slow the steps "
          "while it writes; issue #10's target is a spike <= 10%."
          + (" On CPU both async modes are the same plain copy (staging is CUDA only): a smoke run, not a "
             "measurement." if args.device == "cpu" else ""))
    print(json.dumps({"benchmark": "save_stall", "card": card, "date": datetime.date.today().isoformat(),
                      "layers": args.layers if args.device == "cuda" else "tiny-test", "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "save_every": args.save_every, "chunk_mb": StagedCopy.CHUNK_BYTES >> 20, "results": res}))


if __name__ == "__main__":
    main()
