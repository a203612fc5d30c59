"""Where a decode step's time goes against its bandwidth floor (issue 15: >= 80% of the floor at batch 64, 4K-64K).

One `LLMEngine.step()` of B sequences decoding at context C (the KV cache and states filled with random values
instead of a prefill, the scheduler, block tables and slots real: benchmarks/long_context.py's method), random
weights of the chosen shape. Reports, per (B, C):
- wall: the time of `--repeat` consecutive steps over their number, synchronised once after the last (a step's
  own copy of its tokens to the host is its sync; with async scheduling the next step is already running then);
- GPU busy: the union of the kernel intervals of `--profile-steps` profiled steps, per step (kernels replayed from
  a CUDA graph included, as the profiler records them);
- floor: (weight bytes the step reads, each expert some token routes to counted once, + KV read + linear states read
  and written) / the measured copy bandwidth;
- floor / wall (the figure the target is about), busy / wall (the rest is host time between steps and launch gaps:
  lowering it is host work) and floor / busy (the kernels' own efficiency);
- the kernels taking the most GPU time;
- the host split around the model call (`host_split`): time before it, in it (synchronised), after it (sync
  engines only: the split's syncs would undo the overlap).
Each point runs once per `--modes` entry: `sync` (`--no-async-scheduling`) and `async` (the CUDA default: the next
decode step launched before this one's tokens reach the host), on the same weights in the same process.

    PYTHONPATH=. python benchmarks/decode_step.py                         # one GPU: hybrid, B=64, C=4K and 32K
    PYTHONPATH=. python benchmarks/decode_step.py --model flash --fp8 --batch 32 --contexts 16384
    PYTHONPATH=. python benchmarks/decode_step.py --device cpu            # tiny preset, wall only: checks the script
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from long_context import MODELS, copy_bandwidth, decode_engine, floor_bytes, random_model, sync
from ringlinear.models.presets import get_preset


def gpu_busy_ms(eng, dev, steps, top):
    """(busy ms per step, [(kernel, ms per step)] of the `top` largest) over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        sync(dev)
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, end = 0.0, float("-inf")
    for s, e in sorted((e.time_range.start, e.time_range.end) for e in ev):
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    per = {}
    for e in ev:
        per[e.name] = per.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
    ranked = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return busy / 1e3 / steps, [(n, t / 1e3 / steps) for n, t in ranked]


def host_split(eng, dev, steps):
    """Medians (ms) of where a step's wall time goes, around the model call: `pre` = step start -> the runner's
    execute (scheduling, input lists; the GPU idles), `model` = execute until its work is done (inputs copied, graph
    replayed, synchronised here), `post` = the rest (sampling, its host copy, outputs, bookkeeping). The sync inside
    adds one to a step that would sync in sampling anyway."""
    inner = eng.runner.execute
    marks = {}

    def timed(batch, ids=None):
        marks["in"] = time.perf_counter()
        out = inner(batch, ids)
        sync(dev)
        marks["out"] = time.perf_counter()
        return out
    eng.runner.execute = timed
    rows = []
    try:
        for _ in range(steps):
            sync(dev)
            t0 = time.perf_counter()
            eng.step()
            sync(dev)
            t1 = time.perf_counter()
            rows.append(((marks["in"] - t0) * 1e3, (marks["out"] - marks["in"]) * 1e3, (t1 - marks["out"]) * 1e3))
    finally:
        eng.runner.execute = inner
    return {k: statistics.median(r[i] for r in rows) for i, k in enumerate(("pre_ms", "model_ms", "post_ms"))}


def point(model, args, dev, bw, C, mode) -> dict:
    """One (context, mode) point: wall, host split (sync), busy, floor and the top kernels (GPU)."""
    cpu = dev.type == "cpu"
    eng = decode_engine(model, args.batch, C, 2 * args.repeat + args.profile_steps + 16,
                        async_scheduling=mode == "async")
    while len(eng.scheduler.waiting) or any(s.num_uncomputed > 1 for s in eng.scheduler.running):
        eng.step()  # the faked prefill
    for _ in range(3):  # warm-up decode steps (graph capture happened at build)
        eng.step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        eng.step()
    sync(dev)
    p = {"batch": args.batch, "context": C, "mode": mode, "wall_ms": (time.perf_counter() - t0) * 1e3 / args.repeat,
         "async_scheduled_steps": eng.stats()["async_scheduled_steps"]}
    tag = f"C={C} {mode}"
    if mode == "sync":
        p["host_split"] = hs = host_split(eng, dev, args.repeat)
        print(f"{tag}: around the model call: pre {hs['pre_ms']:.3f} ms, model (synced) {hs['model_ms']:.3f} ms, "
              f"post {hs['post_ms']:.3f} ms", flush=True)
    if cpu:
        print(f"{tag}: wall {p['wall_ms']:.2f} ms (CPU: no profile, no floor)", flush=True)
        return p
    p["busy_ms"], kernels = gpu_busy_ms(eng, dev, args.profile_steps, args.top)
    p["floor_ms"] = floor_bytes(model, args.batch, C) / bw * 1e3
    p.update(floor_of_wall=p["floor_ms"] / p["wall_ms"], busy_of_wall=p["busy_ms"] / p["wall_ms"],
             floor_of_busy=p["floor_ms"] / p["busy_ms"], kernels=kernels)
    print(f"\n{tag}: wall {p['wall_ms']:.2f} ms, GPU busy {p['busy_ms']:.2f} ms, floor {p['floor_ms']:.2f} ms"
          f" -> floor/wall {p['floor_of_wall']:.0%}, busy/wall {p['busy_of_wall']:.0%}, floor/busy "
          f"{p['floor_of_busy']:.0%}", flush=True)
    for name, ms in kernels:
        print(f"  {ms:8.3f} ms  {name[:110]}")
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="hybrid", choices=sorted(MODELS))
    ap.add_argument("--fp8", action="store_true", help="FP8 weights (as --quantization fp8 serves them)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--contexts", default="4096,32768", help="comma list of decode contexts")
    ap.add_argument("--repeat", type=int, default=20, help="timed steps per point")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per point")
    ap.add_argument("--modes", default="sync,async", help="comma list of sync / async (async scheduling)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if not modes or any(m not in ("sync", "async") for m in modes):
        raise SystemExit(f"--modes: a comma list of sync and async, got {args.modes!r}")
    try:
        contexts = [int(x) for x in args.contexts.split(",")]
    except ValueError:
        raise SystemExit("--contexts: comma-separated integers, e.g. 4096,32768")
    if min(contexts) < 1 or args.batch < 1:
        raise SystemExit("--batch and --contexts must be >= 1")
    dev = torch.device(args.device)
    cpu = dev.type == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (--device cpu runs the tiny preset as a smoke check)")
    cfg = get_preset("tiny") if cpu else MODELS[args.model]()
    model = random_model(cfg, dev, fp8=args.fp8)
    card = "cpu" if cpu else torch.cuda.get_device_name(dev)
    bw = None if cpu else copy_bandwidth(dev)
    res = {"card": card, "date": time.strftime("%Y-%m-%d"), "model": "tiny" if cpu else args.model,
           "fp8": args.fp8, "copy_bw_TBps": bw / 1e12 if bw else None, "points": []}
    print(f"{card}, {res['model']}{' FP8' if args.fp8 else ''}, batch {args.batch}"
          + (f", copy bandwidth {bw / 1e12:.2f} TB/s" if bw else ""), flush=True)
    for C in contexts:
        for mode in modes:
            res["points"].append(point(model, args, dev, bw, C, mode))
            gc.collect()  # the execute wrapper is a reference cycle through the engine: free its cache now
            if not cpu:
                torch.cuda.empty_cache()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
