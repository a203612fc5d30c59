"""GRPO steps of `ringlinear rl` on one GPU: rollout tokens/s, training tokens/s, the time split, and the
rollout-vs-training mismatch figures at long responses, in both numerics modes.

The model: random bf16 weights of a Ring-mini-linear-2.0-like slice (hidden 2048, 16 heads x 128, 4 KV heads,
partial RoPE, vocab 157184; --layers 5 = 4 linear + 1 softmax, the first dense; MoE with --experts routed experts
top-8 + a shared one; Ring-mini has 256, fewer keep the random init and the checkpoint small). `--shape small` uses
the 8-layer `small` preset instead. Responses are length-forced (ignore_eos) to each --lengths value, so every
sample is exactly L tokens: prompts x group samples x L rollout tokens per step.

What each figure is:
- rollout tok/s: generated tokens / wall time of the rollout (engine wake-up incl. CUDA-graph recapture, prefill,
  decode, sleep); `engine mem` is the wake+sleep part of it.
- train tok/s: packed tokens (prompt + completion) through forward + backward / wall time of the training phase.
- mismatch: the engine's log-probs (temperature 1) against the training forward's at the same weights (the
  step's first forward), over every sampled token. Random weights give near-uniform distributions, so
  frac_dp_gt_0.8 is ~0 by construction; max/mean |dlogp| and the KL measure the numeric gap of the two paths.
- aligned: the engine runs the training forward's arithmetic (docs/numerics.md), so its mismatch row reads exactly 0
  (tests/rl check it bit for bit); the time beside it is the price.

Each (mode, length) is one RLTrainer step after one warm-up step per mode at the shortest length (Triton
compilation) in the same process. Prints a table and a final JSON line.
Run: PYTHONPATH=. python benchmarks/rl.py [--lengths 4096,16384] [--modes default,aligned] [--quick]
(`--device cpu --shape small --quick` is a seconds-scale smoke run of the script itself, fp32.)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

from ringlinear.models.demo import make_tiny_checkpoint
from ringlinear.rl import MISMATCH_KEYS, RLConfig
from ringlinear.rl.trainer import RLTrainer


def reward(prompt: str, completion: str, record: dict) -> float:
    """A reward with spread over random completions (parity of their first characters), so advantages are
    non-zero and the update is a real one."""
    return float(sum(map(ord, completion[:64])) % 2)


def build_checkpoint(path: str, shape: str, layers: int, experts: int, max_len: int, dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if shape == "small":
        return make_tiny_checkpoint(path, preset="small", dtype=dtype, torch_dtype=name,
                                    max_position_embeddings=max(8192, max_len))
    return make_tiny_checkpoint(path, preset="ring-mini-linear-2.0", dtype=dtype, torch_dtype=name,
                                num_hidden_layers=layers, num_experts=experts,
                                max_position_embeddings=max(32768, max_len))


def one_step(model_dir, data, out, mode, length, args) -> dict:
    cuda = args.device == "cuda"
    cfg = RLConfig(model=model_dir, task="jsonl", data=data, reward=f"{os.path.abspath(__file__)}:reward", out=out,
                   steps=1, numerics=mode, temperature=1.0, max_new_tokens=length, ignore_eos=True,
                   prompts_per_step=args.prompts, group_size=args.group_size, max_num_seqs=args.prompts * args.group_size,
                   micro_batch_tokens=args.micro_batch_tokens, grad_checkpointing=True, lr=1e-6, device=args.device,
                   dtype="bfloat16" if cuda else "float32", progress=False, plot=False, save_every=0, overwrite=True)
    tr = RLTrainer(cfg)
    try:
        if cuda:
            torch.cuda.synchronize()
        rec = tr.run_step()
        rec["peak_gib"] = 0.0
        if cuda:
            torch.cuda.synchronize()
            rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        tr.close()
        del tr
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,16384", help="response lengths (tokens), comma-separated")
    ap.add_argument("--modes", default="default,aligned")
    ap.add_argument("--shape", default="mini-slice", choices=["mini-slice", "small"])
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--micro-batch-tokens", type=int, default=32768)
    ap.add_argument("--quick", action="store_true", help="lengths 1024 only (a smoke run)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/rl.py needs a CUDA GPU (--device cpu for a smoke run)")
    lengths = [1024] if args.quick else [int(x) for x in args.lengths.split(",")]
    if args.quick and args.device == "cpu":
        lengths = [32]
    modes = args.modes.split(",")
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    work = tempfile.mkdtemp(prefix="ringlinear-bench-rl-")
    t0 = time.perf_counter()
    model_dir = build_checkpoint(os.path.join(work, "model"), args.shape, args.layers, args.experts, max(lengths) + 512,
                                 torch.bfloat16 if args.device == "cuda" else torch.float32)
    data = os.path.join(work, "prompts.jsonl")
    with open(data, "w") as f:
        for i in range(args.prompts):
            f.write(json.dumps({"prompt": f"The hybrid model interleaves linear attention layers {i}"}) + "\n")
    print(f"{card}: checkpoint ({args.shape}) built in {time.perf_counter() - t0:.0f}s", flush=True)
    # Warm-up at the shortest measured length: after a 64-token warm-up, default mode's first 4K step trained for
    # 6.2 s where aligned took 0.5 s (H200), most likely compiling: short rows take the split lightning plan, a
    # different kernel variant from long ones.
    warm = {m: one_step(model_dir, data, os.path.join(work, f"warm-{m}"), m, min(lengths), args) for m in modes}
    rows = []
    for mode in modes:
        for L in lengths:
            r = one_step(model_dir, data, os.path.join(work, f"{mode}-{L}"), mode, L, args)
            rows.append({"mode": mode, "length": L, "samples": args.prompts * args.group_size,
                         **{k: r[k] for k in ("rollout_tok_s", "train_tok_s", "time_rollout_s", "time_engine_memory_s",
                                              "time_reward_s", "time_train_s", "clip_frac", "ratio_max", "ratio_min",
                                              "peak_gib", *MISMATCH_KEYS)}})
            print(f"  {mode} L={L}: done in {r['time_rollout_s'] + r['time_train_s']:.0f}s", flush=True)
    shape = args.shape + (f" ({args.layers} layers, {args.experts} experts)" if args.shape == "mini-slice" else "")
    print(f"\nGRPO step, {card}, {shape}, {args.prompts} prompts x {args.group_size} samples")
    hdr = (f"{'mode':<8}{'L':>6}{'rollout tok/s':>14}{'train tok/s':>12}{'rollout s':>10}{'engine mem s':>13}"
           f"{'train s':>9}{'max|dlogp|':>11}{'mean|dlogp|':>12}{'KL':>10}{'dp>0.8':>8}{'ratio max':>10}{'GiB':>6}")
    print(hdr)
    for r in rows:
        print(f"{r['mode']:<8}{r['length']:>6}{r['rollout_tok_s']:>14.0f}{r['train_tok_s']:>12.0f}"
              f"{r['time_rollout_s']:>10.1f}{r['time_engine_memory_s']:>13.2f}{r['time_train_s']:>9.1f}"
              f"{r['max_abs_dlogp']:>11.2e}{r['mean_abs_dlogp']:>12.2e}{r['kl_rollout_train']:>10.1e}"
              f"{r['frac_dp_gt_0.8']:>8.1e}{r['ratio_max']:>10.6f}{r['peak_gib']:>6.1f}")
    print(json.dumps({"benchmark": "rl", "card": card, "shape": args.shape, "layers": args.layers,
                      "experts": args.experts, "warmup_mismatch": {m: warm[m]["max_abs_dlogp"] for m in modes},
                      "rows": rows}))


if __name__ == "__main__":
    main()
