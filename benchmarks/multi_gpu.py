#!/usr/bin/env python3
"""Multi-GPU runs of issue 17 (one node, NCCL), random weights at the published shapes.

train (under torchrun, one process per GPU): the `ringlinear train --fsdp --ep N` step (ringlinear.train.step:
forward, backward, expert-gradient reduction, clipping, MasterAdamW) with bf16 parameters and fp32 master weights.
  1. a 5-layer slice of Ring-mini-linear-2.0 (dense layer, 3 linear + 1 softmax attention, 4 MoE layers of 256
     experts top-8) on one GPU (rank 0 alone, no collectives) and on all N GPUs with FSDP2 + EP, the same rows
     per GPU: weak-scaling efficiency = tokens/s on N / (N x tokens/s on one);
  2. the full Ring-mini shape (20 layers, 16.4B parameters) on all N GPUs, when its weights, gradients and
     optimizer state (16 B per parameter, experts over the EP group, the rest over the world) fit; otherwise the
     row says so with the estimate.
  Tokens/s over the whole world; MFU = FLOP/s per GPU / peak, FLOPs per token from benchmarks/train_step.py
  (`flops_per_token`), peak = the measured bf16 GEMM rate (8192^3) and the datasheet 989 TFLOP/s. The model is
  built on the meta device, sharded, then allocated and drawn per rank (no full copy anywhere).
serve (a plain process; the engine starts its other ranks): Ring-flash-linear-2.0 shape (104B parameters, bf16)
  with --tp 2 (attention, dense layers and shared expert split, routed experts split by expert): prefill of one
  request of T tokens (time to first token, tokens/s) and decode of B requests at context C (output tokens/s,
  CUDA graphs as the engine configures them) after a real prefill. No one-GPU baseline: 208 GB of bf16 weights do
  not fit one H200.

Run (NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set here unless given):
  torchrun --nproc-per-node 2 benchmarks/multi_gpu.py train        # also 4, 8; --ep defaults to the world
  PYTHONPATH=. python benchmarks/multi_gpu.py serve --tp 2 [--quick]
  CPU smoke runs of the same code (gloo, the tiny model): torchrun --nproc-per-node 2 benchmarks/multi_gpu.py
  train --smoke; PYTHONPATH=. python benchmarks/multi_gpu.py serve --smoke
Each prints a table and a final JSON line (also written to $OUT/multi_gpu_{train,serve}.json when OUT is set).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
from types import SimpleNamespace

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_step import DATASHEET_TFLOPS, doc_lengths, flops_per_token, gemm_peak  # noqa: E402
from ringlinear.models.modeling import RingLinearForCausalLM  # noqa: E402
from ringlinear.models.presets import get_preset  # noqa: E402
from ringlinear.parallel.expert import ExpertParallel  # noqa: E402
from ringlinear.train import dist as D  # noqa: E402
from ringlinear.train import fsdp  # noqa: E402
from ringlinear.train import step as S  # noqa: E402
from ringlinear.train.balance import MoEBalancer  # noqa: E402
from ringlinear.train.optim import make_optimizer  # noqa: E402

GiB = 1 << 30


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, warmup, rep):
    for _ in range(warmup):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(rep):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / rep


def batch_on(cfg, tokens, seq, seed, dev):
    """Random tokens packed into documents of lengths uniform in [seq/8, seq] (as benchmarks/train_step.py)."""
    lens = doc_lengths(tokens, seq, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=g)
    labels = torch.roll(ids, -1, 1)
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    labels[0, torch.tensor(cu[1:]) - 1] = -100
    rows = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return {"input_ids": ids.to(dev), "labels": labels.to(dev), "cu_seqlens": torch.tensor(cu, dtype=torch.int32,
            device=dev), "cu_host": cu, "max_seqlen": max(lens), "row_ids": rows.to(dev), "n_rows": len(lens),
            "n_targets": int((labels != -100).sum()), "lens": lens}


@torch.no_grad()
def _draw(model, cfg, seed):
    """Random local shards (normal(0, initializer_range); norms 1): the values do not matter for speed."""
    gen = None
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if gen is None:
            gen = torch.Generator(device=local.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        else:
            local.normal_(0.0, cfg.initializer_range, generator=gen)


def build_train(cfg, env, ep, dtype):
    """bf16 model built on meta, EP + FSDP2 applied (world > 1), allocated on this rank's device, drawn."""
    with torch.device("meta"):
        model = RingLinearForCausalLM(cfg)
    model.to(dtype)
    ep_obj = None
    if env.world > 1:
        if ep > 1:
            ep_obj = ExpertParallel(ep, env.world, env.device.type)
            ep_obj.apply(model)
        fsdp.apply_fsdp(model, env)
    model.to_empty(device=env.device)
    _draw(model, cfg, seed=env.rank)
    return model.train(), ep_obj


def trainer_like(model, ep_obj, env, rows_global, seq):
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8, env.device.type, per_tensor=ep_obj is not None)
    return SimpleNamespace(model=model, fwd=model, ddp=None, ep=ep_obj, cp=None, env=env, opt=opt,
                           lr_sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                           balancer=MoEBalancer(model, 1e-3, 0.0), autocast=contextlib.nullcontext,
                           sched_rows=SimpleNamespace(global_rows=rows_global),
                           cfg=SimpleNamespace(seq_len=seq, grad_clip=1.0))


def state_bytes_per_rank(cfg, world, ep) -> int:
    """bf16 weights + bf16 gradients + fp32 master, exp_avg, exp_avg_sq = 16 B per parameter held."""
    with torch.device("meta"):
        m = RingLinearForCausalLM(cfg)
    experts = sum(p.numel() for n, p in m.named_parameters() if n.endswith((".w13", ".w2")))
    rest = sum(p.numel() for p in m.parameters()) - experts
    return 16 * (experts // ep + rest // world)


def train_point(name, cfg, env, ep, seq, rows, reps):
    """One configuration's step on env's ranks: tokens/s (all of them), step ms (the slowest), peak memory."""
    dev = env.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    model, ep_obj = build_train(cfg, env, ep, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    world = env.world
    tr = trainer_like(model, ep_obj, env, rows * world, seq)
    batch = batch_on(cfg, rows * seq, seq, seed=1 + env.rank, dev=dev)

    def step():
        S.forward_backward(tr, [batch])
        S.optimizer_step(tr)
    t = timed(step, dev, 2, reps)
    if world > 1:
        tt = torch.tensor([t], device=dev)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        t = float(tt)
    fpt, _ = flops_per_token(cfg, batch["lens"])
    tokens = rows * seq * world
    peak = torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else float("nan")
    tr = model = None  # freed before the next point is built
    gc.collect()
    return {"name": name, "gpus": world, "ep": ep if world > 1 else 1, "layers": cfg.num_hidden_layers,
            "tokens_per_step": tokens, "step_ms": 1e3 * t, "tok_s": tokens / t,
            "tflops_per_gpu": fpt * tokens / t / world / 1e12, "peak_gib": peak}


def run_train(args):
    dev_arg = "cpu" if args.smoke else "cuda"
    env = D.setup(dev_arg)
    world = env.world
    ep = args.ep or world
    if args.smoke:
        torch.set_num_threads(1)
        base = get_preset("tiny")
        sl, full, seq, rows, reps, label = base, base, 64, 2, 1, "tiny"
    else:
        full = get_preset("ring-mini-linear-2.0")
        sl = full.replace(num_hidden_layers=5)
        seq, rows, reps, label = 4096, (1 if args.quick else 2), (2 if args.quick else 4), "mini"
    card = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    peak = gemm_peak() if env.device.type == "cuda" else float("nan")
    res = {"card": card, "gpus": world, "ep": ep, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "bf16_gemm_tflops": peak, "seq": seq, "rows_per_gpu": rows, "points": []}

    def record(r):
        r["mfu_measured_peak"] = r.get("tflops_per_gpu", float("nan")) / peak
        r["mfu_datasheet"] = r.get("tflops_per_gpu", float("nan")) / DATASHEET_TFLOPS
        res["points"].append(r)
        if env.is_main:
            print(json.dumps(r), flush=True)

    # 1. the slice alone on rank 0 (the others wait), then on every rank
    if env.is_main:
        alone = D.DistEnv(0, 1, env.local_rank, env.device, False)  # no collectives
        record(train_point(f"{label}-{sl.num_hidden_layers}L 1 GPU", sl, alone, 1, seq, rows, reps))
    D.barrier(env)
    record(train_point(f"{label}-{sl.num_hidden_layers}L", sl, env, ep, seq, rows, reps))
    one, many = res["points"][0] if env.is_main else None, res["points"][-1]
    if env.is_main:
        many["scaling_efficiency"] = many["tok_s"] / (world * one["tok_s"])
    # 2. the full shape, when its state fits
    need = state_bytes_per_rank(full, world, ep)
    have = torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else 1 << 62
    name = f"{label}-{full.num_hidden_layers}L (full)"
    if need > 0.85 * have:
        record({"name": name, "gpus": world, "ep": ep, "skipped": f"weights + grads + optimizer state "
                f"{need / GiB:.0f} GiB per GPU of {have / GiB:.0f} GiB: needs more GPUs"})
    else:
        try:
            record(train_point(name, full, env, ep, seq, rows, reps))
        except torch.OutOfMemoryError as e:  # a rank out of memory mid-step cannot rejoin its collectives
            print(f"rank {env.rank}: {name}: out of memory ({e}); ending the run", flush=True)
            os._exit(1)
    if env.is_main:
        print(f"\n{card} x{world}, FSDP2 + EP {ep}, seq {seq}, {rows} rows per GPU, bf16 + fp32 master AdamW "
              f"(bf16 GEMM peak {peak:.0f} TFLOP/s)")
        print(f"{'config':24s} {'GPUs':>4s} {'tok/step':>9s} {'ms':>8s} {'tok/s':>9s} {'TFLOP/s/GPU':>11s} "
              f"{'MFU(meas)':>9s} {'MFU(989)':>8s} {'peak GiB':>8s} {'scaling':>7s}")
        for r in res["points"]:
            if "skipped" in r:
                print(f"{r['name']:24s} {r['gpus']:4d}  skipped: {r['skipped']}")
                continue
            sc = r.get("scaling_efficiency")
            print(f"{r['name']:24s} {r['gpus']:4d} {r['tokens_per_step']:9d} {r['step_ms']:8.1f} {r['tok_s']:9.0f} "
                  f"{r['tflops_per_gpu']:11.1f} {r['mfu_measured_peak']:9.1%} {r['mfu_datasheet']:8.1%} "
                  f"{r['peak_gib']:8.1f} {'-' if sc is None else f'{sc:.0%}':>7s}")
        _save(res, "train")
        print(json.dumps(res))
    D.teardown(env)


def _decode(eng, B, C, steps, vocab, dev):
    """B requests of C prompt tokens, prefilled for real; the median step time where all B decode. The first
    requests decode while the later ones prefill, so every request runs long enough to outlast the prefill."""
    from ringlinear.engine.sampling_params import SamplingParams
    g = torch.Generator().manual_seed(B * 7 + C)
    fill_steps = -(-B * C // eng.config.prefill_chunk)
    for _ in range(B):
        eng.add_request(torch.randint(10, vocab, (C,), generator=g).tolist(),
                        SamplingParams(max_tokens=fill_steps + steps + 4, temperature=0.0, ignore_eos=True))
    times = []
    while eng.has_unfinished():
        all_dec = not eng.scheduler.waiting and all(s.num_uncomputed == 1 for s in eng.scheduler.running)
        sync(dev)
        t0 = time.perf_counter()
        eng.step()
        sync(dev)
        if all_dec and len(eng.scheduler.running) == B:
            times.append(time.perf_counter() - t0)
    times = times[2:]
    if not times:
        raise RuntimeError("no step had every request decoding")
    step = sorted(times)[len(times) // 2]
    return {"batch": B, "context": C, "step_ms": 1e3 * step, "tok_s": B / step}


def _prefill(eng, T, vocab, dev):
    from benchmarks.long_context import time_prefill
    dt = time_prefill(eng, T, vocab, dev)
    return {"tokens": T, "ttft_s": dt, "tok_s": T / dt}


def run_serve(args):
    from ringlinear.engine.config import EngineConfig
    from ringlinear.engine.engine import LLMEngine
    if args.smoke:
        cfg, dev, dtype = get_preset("tiny"), torch.device("cpu"), "float32"
        prefill_T, decode_pts, chunk, steps = [256, 1024], [(4, 256)], 256, 6
    else:
        cfg, dev, dtype = get_preset("ring-flash-linear-2.0"), torch.device("cuda"), "bfloat16"
        # 128K point: 131072 - 64 (prompt + one generated token within max_position_embeddings)
        prefill_T = [4096, 16384] if args.quick else [4096, 16384, 32768, 65536, 131008]
        decode_pts = [(8, 4096)] if args.quick else [(1, 4096), (32, 4096), (32, 16384), (8, 65536)]
        chunk, steps = 16384, (8 if args.quick else 24)
    max_len = max(prefill_T + [C for _, C in decode_pts]) + steps + 64
    max_b = max(B for B, _ in decode_pts)
    ec = EngineConfig(tensor_parallel=args.tp, device=dev.type, dtype=dtype, max_num_seqs=max_b,
                      max_num_batched_tokens=chunk + max_b, prefill_chunk=chunk, max_model_len=max_len,
                      cuda_graph_max_batch=max_b, cuda_graphs=not args.enforce_eager,
                      num_kv_blocks=max_b * -(-max_len // 16) + 16, cpu_threads=1 if args.smoke else None)
    t0 = time.perf_counter()
    eng = LLMEngine(config=ec, random_weights=cfg)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    weights = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    res = {"card": card, "tp": args.tp, "model": "ring-flash-linear-2.0 shape" if not args.smoke else "tiny",
           "dtype": dtype, "date": time.strftime("%Y-%m-%d"), "startup_s": time.perf_counter() - t0,
           "weights_gib_per_gpu": weights / GiB, "cuda_graphs": eng.runner.graphs is not None,
           "prefill": [], "decode": []}
    try:
        for T in prefill_T:
            try:
                r = _prefill(eng, T, cfg.vocab_size, dev)
            except torch.OutOfMemoryError as e:  # rank 0 only: the other ranks wait in the step's collective
                print(f"prefill T={T}: out of memory ({e}); ending the run", flush=True)
                os._exit(1)
            res["prefill"].append(r)
            print(json.dumps({"prefill": r}), flush=True)
        for B, C in decode_pts:
            r = _decode(eng, B, C, steps, cfg.vocab_size, dev)
            res["decode"].append(r)
            print(json.dumps({"decode": r}), flush=True)
    finally:
        eng.close()
    print(f"\n{card}, {res['model']} {dtype}, --tp {args.tp}: {res['weights_gib_per_gpu']:.1f} GiB of weights per "
          f"GPU, CUDA graphs {'on' if res['cuda_graphs'] else 'off'}")
    print(f"{'prefill T':>10s} {'TTFT s':>8s} {'tok/s':>9s}")
    for r in res["prefill"]:
        print(f"{r['tokens']:10d} {r['ttft_s']:8.2f} {r['tok_s']:9.0f}")
    print(f"{'decode B':>10s} {'context':>8s} {'step ms':>8s} {'tok/s':>9s}")
    for r in res["decode"]:
        print(f"{r['batch']:10d} {r['context']:8d} {r['step_ms']:8.2f} {r['tok_s']:9.0f}")
    _save(res, "serve")
    print(json.dumps(res))


def _save(res, kind):
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"multi_gpu_{kind}.json"), "w") as f:
            json.dump(res, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--ep", type=int, default=0, help="expert-parallel group size (default: the world)")
    t.add_argument("--quick", action="store_true")
    t.add_argument("--smoke", action="store_true", help="CPU, gloo, the tiny model (checks the code, not speed)")
    s = sub.add_parser("serve")
    s.add_argument("--tp", type=int, default=2)
    s.add_argument("--quick", action="store_true")
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    s.add_argument("--smoke", action="store_true", help="CPU, gloo, the tiny model (checks the code, not speed)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/multi_gpu.py needs CUDA GPUs (or --smoke on CPU)")
    try:
        (run_train if args.what == "train" else run_serve)(args)
    except Exception:
        traceback.print_exc()
        raise


if __name__ == "__main__":
    main()
