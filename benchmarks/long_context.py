"""Long-context prefill and decode: Ring-mini-linear-2.0 vs its all-softmax twin, through the serving engine.

Both models have the Ring-mini-linear-2.0 shape with random bf16 weights; the twin makes every layer softmax
(layer_group_size = 1: the Ring-mini-2.0 shape). Same process, same engine, same card. `--models` adds the dense
baselines the paper compares against: `qwen3-8b` (Qwen3-8B's shape, paper Fig. 7) and `qwen3-32b` (Fig. 8), every
layer softmax GQA with a dense SwiGLU MLP in this architecture (presets `qwen3-*-shape`: a cost comparison, not a
quality one; they differ from real Qwen3 layers in the QK-norm/RoPE code path only), and `flash` (Ring-flash-linear-
2.0's shape; 208 GB in bf16, so on one H200 it needs `--fp8`, which gives every model FP8 weights). Every model
also reports GPU-seconds per million tokens (1e6 / tok/s on this one GPU).

- prefill: one request of T tokens (batch 1), time to its first token, tokens/s.
- decode: B requests at context C, output tokens/s over steps where every request decodes (CUDA graphs as the
  engine configures them). The prompts' KV cache and states are filled with random values instead of running a
  real prefill (decode cost does not depend on the values; it saves minutes of device time); the engine's
  scheduler, block tables and slots are the real ones. Where a model's cache cannot hold B requests at C, the
  largest batch that fits is used and reported.
- floor per decode step = (weight bytes the step reads, every expert touched by at least one token counted once,
  plus per-request state read+write and KV read) / measured copy bandwidth.

Prints a table and a final JSON line; writes JSON (and a PNG when matplotlib is present) to --out.
Run: PYTHONPATH=. python benchmarks/long_context.py [--quick] [--models hybrid,softmax_twin,qwen3-8b]
     [--only prefill --prefill-lengths 4096] [--eager-prefill] [--models flash,qwen3-32b --fp8]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from ringlinear.engine.config import EngineConfig
from ringlinear.engine.engine import LLMEngine
from ringlinear.engine.sampling_params import SamplingParams
from ringlinear.models.presets import get_preset
from ringlinear.models.context import StatelessContext
from ringlinear.models.modeling import RingLinearForCausalLM

GiB = 1 << 30
MODELS = {  # name -> config; the hybrid first, the baselines after
    "hybrid": lambda: get_preset("ring-mini-linear-2.0"),
    "softmax_twin": lambda: get_preset("ring-mini-linear-2.0").replace(layer_group_size=1),
    "qwen3-8b": lambda: get_preset("qwen3-8b-shape"),
    "flash": lambda: get_preset("ring-flash-linear-2.0"),
    "qwen3-32b": lambda: get_preset("qwen3-32b-shape"),
}


def copy_bandwidth(dev) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ts = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (1 << 30) / sorted(ts[5:])[len(ts[5:]) // 2]


@torch.no_grad()
def random_model(cfg, dev, seed=0, fp8=False):
    """Random bf16 weights allocated directly on the GPU (no CPU init of 16B parameters). fp8: the decoder
    layers' weights as blockwise e4m3 codes + scales (models/fp8_serve.py), drawn and quantised a chunk at a time,
    so the bf16 model never exists (Ring-flash fits one H200 this way)."""
    with torch.device("meta"):
        m = RingLinearForCausalLM(cfg)
    if fp8:
        from ringlinear.models import fp8_serve
        m.to(torch.bfloat16)
        fp8_serve.quantize_fp8_(m)
        m.to_empty(device=dev)
        fp8_serve.init_fp8_random_(m, seed=seed)
        return m.eval()
    m.to(torch.bfloat16).to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, cfg.initializer_range, generator=g)
    for mod in m.modules():
        if hasattr(mod, "expert_bias"):
            mod.expert_bias.normal_(0.0, 1e-3, generator=g)
    return m.eval()


def engine_for(model, num_seqs, tokens_per_seq, chunk, cuda_graphs=True, budget=None, prefill_graphs=True,
               async_scheduling=None):  # None: the engine default (on for CUDA)
    bs = 16
    blocks = num_seqs * (-(-tokens_per_seq // bs) + 1) + 1
    cfg = EngineConfig(max_num_seqs=num_seqs, max_num_batched_tokens=budget or max(chunk, num_seqs),
                       prefill_chunk=chunk,
                       block_size=bs, num_kv_blocks=blocks, max_model_len=tokens_per_seq + 64,
                       cuda_graphs=cuda_graphs, cuda_graph_max_batch=max(1, num_seqs),
                       prefill_cuda_graphs=prefill_graphs, async_scheduling=async_scheduling)
    return LLMEngine(model=model, config=cfg)


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev) -> float:
    return torch.cuda.max_memory_allocated(dev) / GiB if torch.device(dev).type == "cuda" else float("nan")


def time_prefill(eng, T, vocab, dev, repeat=5) -> float:
    """Seconds for the engine to prefill one random T-token prompt and emit its first token: the median of
    `repeat` runs after one that compiles the kernels for these shapes (single runs of a 4K prefill on an H200
    spread from 30 to 58 ms). The prompt has no cached prefix (the engine keeps no snapshot at its end)."""
    ids = torch.randint(10, vocab, (T,)).tolist()
    times = []
    for _ in range(repeat + 1):
        sync(dev)
        t0 = time.perf_counter()
        eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench_prefill(model, T, chunk, prefill_graphs=True):
    """prefill_graphs: the prompt's step replayed from a CUDA graph when it is short enough (as the engine does by
    default; prefill_graph.MAX_GRAPH_TOKENS). Off: every step eager and no graphs captured at all."""
    dev = next(model.parameters()).device
    eng = engine_for(model, 1, T + 8, chunk, cuda_graphs=prefill_graphs, prefill_graphs=prefill_graphs)
    dt = time_prefill(eng, T, model.config.vocab_size, dev)
    peak = peak_gib(dev)
    del eng
    return T / dt, dt, peak


def fits(model, B, C, free_bytes):
    cfg = model.config
    n_sm = len(cfg.softmax_layers)
    n_lin = cfg.num_hidden_layers - n_sm
    per_seq = C * n_sm * 2 * cfg.num_key_value_heads * cfg.head_dim_ * 2 + n_lin * cfg.num_attention_heads * \
        cfg.head_dim_ ** 2 * 4
    return per_seq * B <= free_bytes


@torch.no_grad()
def touched_weight_bytes(model, B):
    """Weight bytes one decode step of B tokens reads: everything but the experts, plus each expert that at least
    one of the B tokens routes to (measured on a random batch), plus the lm_head; embeddings: B rows. FP8 weights
    (models/fp8_serve.py: codes + scales, buffers) count at their stored size."""
    cfg = model.config
    dev = next(model.parameters()).device
    moes = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "record_stats")]
    for m in moes:
        m.record_stats = True
    ids = torch.randint(10, cfg.vocab_size, (B,), device=dev)
    ctx = StatelessContext(torch.arange(B + 1, device=dev, dtype=torch.int32))
    model.forward_packed(ids, ctx)
    stack_names = ("w13", "w2", "w13_scale_inv", "w2_scale_inv")
    routed = {id(getattr(m, k)) for m in moes for k in stack_names if hasattr(m, k)}
    weights = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                 if b.dtype == torch.float8_e4m3fn or n.endswith("_scale_inv")]
    total = sum(t.numel() * t.element_size() for n, t in weights if id(t) not in routed and "word_embeddings" not in n)
    for m in moes:
        per_expert = sum(getattr(m, k)[0].numel() * getattr(m, k).element_size() for k in stack_names if hasattr(m, k))
        total += int(torch.unique(m.last_topk_idx).numel()) * per_expert
        m.record_stats = False
        m.last_topk_idx = m.last_router_logits = None
    return total + B * cfg.hidden_size * 2


def decode_engine(model, B, C, max_tokens, async_scheduling=False):
    """An engine with B requests of C-token prompts whose prefill is faked: the KV cache and states hold random
    values (a real prefill's cost without running it), prefill pieces return zero logits, decode runs for real.
    The whole fake prefill is scheduled in one step, so every request decodes from step 2 on. Sync scheduling by
    default: bench_decode times each step between two device syncs, which async scheduling's overlap defeats
    (decode_step.py times both modes over consecutive steps)."""
    cfg = model.config
    dev = next(model.parameters()).device
    chunk = -(-C // 64) * 64
    eng = engine_for(model, B, C + max_tokens + 4, chunk, budget=B * chunk, prefill_graphs=False,
                     async_scheduling=async_scheduling)
    for d in (eng.kv.k, eng.kv.v):
        for t in d.values():
            t.normal_()
    for t in eng.states.states.values():
        t.normal_()
    real = eng.runner.execute

    def execute(batch, ids=None):  # a reference cycle through the engine: callers gc.collect() after dropping it
        if batch.all_decode:
            return real(batch, ids)
        return torch.zeros(sum(1 for s in batch.seqs if s.sample), cfg.vocab_size, device=dev)
    eng.runner.execute = execute
    for _ in range(B):
        eng.add_request(torch.randint(10, cfg.vocab_size, (C,)).tolist(),
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return eng


def floor_bytes(model, B, C) -> float:
    """Bytes one decode step of B sequences at context C must move: touched weights, KV read, states read+written."""
    cfg = model.config
    n_sm = len(cfg.softmax_layers)
    state_b = (cfg.num_hidden_layers - n_sm) * cfg.num_attention_heads * cfg.head_dim_ ** 2 * 4 * 2
    kv_b = C * n_sm * 2 * cfg.num_key_value_heads * cfg.head_dim_ * 2
    return touched_weight_bytes(model, B) + B * (state_b + kv_b)


def bench_decode(model, B, C, steps, bw):
    dev = next(model.parameters()).device
    eng = decode_engine(model, B, C, steps + 4)
    times = []
    while eng.has_unfinished():
        all_dec = len(eng.scheduler.waiting) == 0 and all(s.num_uncomputed == 1 for s in eng.scheduler.running)
        sync(dev)
        t0 = time.perf_counter()
        eng.step()
        sync(dev)
        if all_dec and len(eng.scheduler.running) == B:
            times.append(time.perf_counter() - t0)
    times = times[2:]  # warm-up
    if not times:
        raise RuntimeError("no step had every request decoding")
    step = sorted(times)[len(times) // 2]
    floor = floor_bytes(model, B, C) / bw
    peak = peak_gib(dev)
    del eng
    return {"batch": B, "context": C, "step_ms": step * 1e3, "tok_s": B / step, "floor_ms": floor * 1e3,
            "pct_of_floor": 100 * floor / step, "peak_gib": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--plot-from", help="only draw the PNG from an earlier JSON result")
    ap.add_argument("--only", choices=["prefill", "decode"], help="run one half")
    ap.add_argument("--models", default="hybrid,softmax_twin",
                    help=f"comma list of {', '.join(MODELS)}; ratios are against the first")
    ap.add_argument("--prefill-lengths", help="comma list of prompt lengths (default: 4K-128K; --quick 4K, 16K)")
    ap.add_argument("--decode-contexts", help="comma list of decode contexts (default: 4K-64K; --quick 4K)")
    ap.add_argument("--fp8", action="store_true",
                    help="every model with FP8 weights (blockwise e4m3, as --quantization fp8 serves them): e.g. "
                         "--models flash,qwen3-32b --fp8, the paper's Fig. 8 comparison on one H200")
    ap.add_argument("--eager-prefill", action="store_true",
                    help="prefill points: no CUDA graphs at all (the decode points never use prefill graphs)")
    args = ap.parse_args()
    if args.plot_from:
        plot(json.load(open(args.plot_from)), os.path.dirname(os.path.abspath(args.plot_from)))
        return
    # 128K point: 131072 - 64, since prompt + one generated token must fit max_position_embeddings (131072).
    prefill_T = [4096, 16384] if args.quick else [4096, 16384, 32768, 65536, 131008]
    decode_C = [4096] if args.quick else [4096, 16384, 32768, 65536]
    try:  # e.g. `--only prefill --prefill-lengths 4096`: the short-prompt ratio alone, in about a minute
        prefill_T = [int(x) for x in args.prefill_lengths.split(",")] if args.prefill_lengths else prefill_T
        decode_C = [int(x) for x in args.decode_contexts.split(",")] if args.decode_contexts else decode_C
    except ValueError:
        raise SystemExit("--prefill-lengths / --decode-contexts: comma-separated integers, e.g. 4096,16384")
    if min(prefill_T + decode_C) < 1:
        raise SystemExit("--prefill-lengths / --decode-contexts: lengths must be >= 1")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        raise SystemExit(f"--models: unknown {bad or 'empty list'}; choose from {', '.join(MODELS)}")
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    bw = copy_bandwidth(dev)
    steps = 8 if args.quick else 24
    models = {n: MODELS[n]() for n in names}
    res = {"card": card, "copy_bw_TBps": bw / 1e12, "date": time.strftime("%Y-%m-%d"), "prefill": {}, "decode": {},
           "prefill_graphs": not args.eager_prefill, "fp8": args.fp8}
    for name, cfg in models.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model = random_model(cfg, dev, fp8=args.fp8)
        except torch.OutOfMemoryError:  # e.g. flash in bf16 on one GPU: say so, run the rest
            res["prefill"][name] = res["decode"][name] = {}
            res.setdefault("errors", {})[name] = "weights do not fit this GPU"
            print(f"[{name}] weights do not fit this GPU: skipped", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        print(f"[{name}] {weights / GiB:.1f} GiB of weights", flush=True)
        res.setdefault("weights_gib", {})[name] = weights / GiB
        res["prefill"][name] = {}
        for T in (prefill_T if args.only != "decode" else []):
            torch.cuda.reset_peak_memory_stats()
            try:  # the whole prompt in one engine step (the best case for both models)
                tps, dt, peak = bench_prefill(model, T, chunk=-(-T // 64) * 64, prefill_graphs=not args.eager_prefill)
            except Exception as e:  # record and go on: one failing point must not lose the others
                res["prefill"][name][T] = {"error": f"{type(e).__name__}: {e}"}
                print(f"  prefill T={T}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            finally:
                gc.collect()
                torch.cuda.empty_cache()
            res["prefill"][name][T] = {"tok_s": tps, "s": dt, "peak_gib": peak}
            print(f"  prefill T={T:>6}: {tps:>9.0f} tok/s ({dt:.2f} s), peak {peak:.1f} GiB", flush=True)
            save(res, args.out)
        res["decode"][name] = {}
        for C in (decode_C if args.only != "prefill" else []):
            free = torch.cuda.mem_get_info(dev)[0] - 6 * GiB
            B = 64
            while B > 1 and not fits(model, B, C + steps + 16, free):
                B //= 2
            torch.cuda.reset_peak_memory_stats()
            try:
                r = bench_decode(model, B, C, steps, bw)
            except Exception as e:
                res["decode"][name][C] = {"error": f"{type(e).__name__}: {e}", "batch": B}
                print(f"  decode C={C} B={B}: FAILED {type(e).__name__}: {e}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            res["decode"][name][C] = r
            save(res, args.out)
            print(f"  decode C={C:>6} B={B:>3}: {r['tok_s']:>8.0f} tok/s, step {r['step_ms']:.2f} ms, floor "
                  f"{r['floor_ms']:.2f} ms ({r['pct_of_floor']:.0f}%), peak {r['peak_gib']:.1f} GiB", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\ncard: {card}, copy bandwidth {bw / 1e12:.2f} TB/s; ratio = tok/s over the first model's; "
          "GPU-s/Mtok = 1e6 / tok/s")
    first, nan = names[0], {"tok_s": float("nan"), "batch": "-"}
    print(f"{'point':<22}" + "".join(f"{n:>14}" for n in names) + "".join(f"{'x ' + n:>16}" for n in names[1:])
          + "".join(f"{'GPU-s/Mtok ' + n:>24}" for n in names))
    for part, key, label in (("prefill", prefill_T, "prefill T="), ("decode", decode_C, "decode C=")):
        for x in key:
            tps = [res[part].get(n, {}).get(x, nan).get("tok_s", float("nan")) for n in names]
            print(f"{label + str(x):<22}" + "".join(f"{t:>14.0f}" for t in tps)
                  + "".join(f"{tps[0] / t:>16.2f}" for t in tps[1:]) + "".join(f"{1e6 / t:>24.1f}" for t in tps)
                  + ("   (batch " + " / ".join(str(res[part].get(n, {}).get(x, nan).get("batch")) for n in names)
                     + ")" if part == "decode" else ""))
    for part in ("prefill", "decode"):
        for n in names:
            for r in res[part].get(n, {}).values():
                if "tok_s" in r:
                    r["gpu_s_per_mtok"] = 1e6 / r["tok_s"]
    res["ratios_vs"] = first
    save(res, args.out)
    plot(res, args.out)
    print(json.dumps(res))


def save(res, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "long_context.json"), "w") as f:
        json.dump(res, f, indent=1)


def plot(res, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot; rerun with --plot-from JSON elsewhere)")
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in zip(res["prefill"], ("o-", "s--", "^:", "d-.", "v-")):
        for a, part in zip(ax, ("prefill", "decode")):
            pts = {int(k): v for k, v in res[part].get(name, {}).items() if "tok_s" in v}
            xs = sorted(pts)
            a.plot(xs, [pts[x]["tok_s"] for x in xs], style, label=name)
    for a, t in zip(ax, ("prefill, batch 1 (tok/s)", "decode, batch 64 or largest fitting (tok/s)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("context tokens")
        a.set_title(t)
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"{' vs '.join(res['prefill'])}: random weights, one engine — {res['card']} ({res['date']})")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "long_context.png"), dpi=110)


if __name__ == "__main__":
    main()
