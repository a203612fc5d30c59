"""Prefix caching on the GPU: a shared-system-prompt workload and a multi-turn chat workload, with and without it.

Random bf16 weights of the Ring-mini-linear-2.0 shape (built as benchmarks/long_context.py builds them), the
serving engine in this process (the GPU box has no HTTP stack; the engine is what the server drives), clients in a
closed loop: each sends its next request the moment its previous one finishes.

- shared: --clients clients, --rounds requests each; prompt = one --system-len token system prompt + a fresh user
  message of --user-len tokens; --out-len tokens out (greedy, ignore_eos).
- chat: --chat-clients conversations of --turns turns; turn 1 is --chat-first tokens, every later turn is the
  conversation so far (previous prompt + its answer) + a --chat-user token message; --chat-out tokens out.

Per workload and mode: TTFT p50/p99 (arrival to first token), requests/s, output and prompt tokens/s, the share of
prompt tokens served from the cache. Then a check: a few probe requests, each alone, on both engines (the caching
engine resumes them from what the timed run cached): same greedy tokens, and the largest log-prob difference up to
the first differing token (default numerics on CUDA: exact up to batch variance, which random weights' nearly flat
logits turn into different greedy tokens; `--numerics aligned`: bitwise; see docs/serving.md). Prints a table and a final JSON line.

    PYTHONPATH=. python benchmarks/serve_gpu.py                  # one H200: about 2 minutes
    PYTHONPATH=. python benchmarks/serve_gpu.py --preset tiny --device cpu --quick   # CPU smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from long_context import random_model
from ringlinear.engine.config import EngineConfig
from ringlinear.engine.engine import LLMEngine
from ringlinear.engine.sampling_params import SamplingParams
from ringlinear.models.presets import get_preset

GiB = 1 << 30


def _tokens(g, n, vocab):
    return torch.randint(10, vocab, (n,), generator=g).tolist()


class SharedPromptClient:
    def __init__(self, system, g, rounds, user_len, out_len, vocab):
        self.system, self.g, self.left, self.user_len, self.out_len, self.vocab = system, g, rounds, user_len, \
            out_len, vocab

    def next(self, prev):
        if self.left == 0:
            return None
        self.left -= 1
        n = int(torch.randint(self.user_len[0], self.user_len[1] + 1, (1,), generator=self.g))
        return self.system + _tokens(self.g, n, self.vocab), self.out_len


class ChatClient:
    def __init__(self, g, turns, first, user, out_len, vocab):
        self.g, self.left, self.user, self.out_len, self.vocab = g, turns, user, out_len, vocab
        self.history = _tokens(g, first, vocab)

    def next(self, prev):
        if self.left == 0:
            return None
        self.left -= 1
        if prev is not None:
            self.history = self.history + list(prev.token_ids) + _tokens(self.g, self.user, self.vocab)
        return self.history, self.out_len


def drive(eng, clients, sync):
    """Run the clients' closed loops to the end -> (finished outputs, wall seconds, engine counter deltas)."""
    owner, outs = {}, []
    before = eng.stats()

    def submit(client, prev):
        req = client.next(prev)
        if req is not None:
            rid = eng.add_request(req[0], SamplingParams(max_tokens=req[1], temperature=0, ignore_eos=True))
            owner[rid] = client

    sync()
    t0 = time.perf_counter()
    for c in clients:
        submit(c, None)
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs.append(o)
                submit(owner.pop(o.request_id), o)
    sync()
    wall = time.perf_counter() - t0
    after = eng.stats()
    return outs, wall, {k: after[k] - before[k] for k in ("prefix_cache_hits", "prefix_cache_hit_tokens",
                                                           "prefix_cache_waits", "evicted_blocks",
                                                           "evicted_snapshots")}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(outs, wall, delta):
    ttft = [o.ttft_s for o in outs]
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    return {"requests": len(outs), "wall_s": round(wall, 3), "ttft_ms_p50": round(1e3 * statistics.median(ttft), 1),
            "ttft_ms_p99": round(1e3 * _pct(ttft, 99), 1), "req_s": round(len(outs) / wall, 2),
            "output_tok_s": round(sum(len(o.token_ids) for o in outs) / wall, 1),
            "prompt_tok_s": round(prompt / wall, 1),
            "cached_prompt_frac": round(delta["prefix_cache_hit_tokens"] / prompt, 3), **delta}


def workloads(args, vocab, seed):
    """Fresh clients (same prompts for the same seed) -> {name: clients}."""
    g = torch.Generator().manual_seed(seed)
    system = _tokens(g, args.system_len, vocab)
    shared = [SharedPromptClient(system, torch.Generator().manual_seed(seed + 1 + i), args.rounds, args.user_len,
                                 args.out_len, vocab) for i in range(args.clients)]
    chat = [ChatClient(torch.Generator().manual_seed(seed + 1000 + i), args.turns, args.chat_first, args.chat_user,
                       args.chat_out, vocab) for i in range(args.chat_clients)]
    return {"shared": shared, "chat": chat}, system


def probe(eng, system, args, vocab):
    """A few requests of the shared workload's shape, each alone: (tokens, log-probs) per request."""
    g = torch.Generator().manual_seed(99)
    res = []
    for _ in range(args.probes):
        p = system + _tokens(g, args.user_len[0], vocab)
        eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, logprobs=True, ignore_eos=True), "probe")
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    res.append((o.token_ids, o.logprobs))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="ring-mini-linear-2.0")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--user-len", type=lambda s: tuple(int(x) for x in s.split(":")), default=(64, 192))
    ap.add_argument("--out-len", type=int, default=32)
    ap.add_argument("--chat-clients", type=int, default=32)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--chat-first", type=int, default=1024)
    ap.add_argument("--chat-user", type=int, default=128)
    ap.add_argument("--chat-out", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--kv-cache-gib", type=float, default=40.0)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--numerics", default="default", choices=("default", "aligned"),
                    help="aligned: hits are bitwise and reach into previous answers (deeper chat hits)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="async scheduling on / off in both modes (default: the engine's, on for CUDA)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.rounds, args.system_len, args.user_len, args.out_len = 8, 2, 256, (8, 24), 8
        args.chat_clients, args.turns, args.chat_first, args.chat_user, args.chat_out = 4, 3, 128, 32, 8
        args.prefill_chunk, args.max_num_batched_tokens, args.kv_cache_gib, args.probes = 64, 256, 0.05, 2
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    card = torch.cuda.get_device_name(dev) if cuda else "cpu"
    cfg = get_preset(args.preset)
    model = random_model(cfg, dev)
    vocab = cfg.vocab_size
    longest = max(args.system_len + args.user_len[1],
                  args.chat_first + (args.turns - 1) * (args.chat_out + args.chat_user)) + args.out_len + 64
    results, probes = {}, {}
    for caching in (True, False):
        ecfg = EngineConfig(max_num_seqs=max(args.clients, args.chat_clients), device=args.device,
                            max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk=args.prefill_chunk,
                            kv_cache_bytes=int(args.kv_cache_gib * GiB), max_model_len=longest,
                            enable_prefix_caching=caching, numerics=args.numerics,
                            async_scheduling=args.async_scheduling)
        eng = LLMEngine(model=model, config=ecfg)
        async_scheduling = eng.async_scheduling  # (resolved by device when the flag is unset) for the table
        mode = "cache" if caching else "no-cache"
        # the same workloads with other prompts first, at full size: what the timed run meets (batch shapes,
        # kernel tunings, the allocator's high-water mark) has been met once, in either mode
        warm, _ = workloads(args, vocab, seed=7)
        for name in warm:
            drive(eng, warm[name], sync)
        eng.reset_prefix_cache()
        work, system = workloads(args, vocab, seed=1)
        for name, clients in work.items():
            results[(name, mode)] = summarize(*drive(eng, clients, sync))
            print(f"{name:7s} {mode:9s} {results[(name, mode)]}", flush=True)
        probes[mode] = probe(eng, system, args, vocab)
        results[("shared", mode)]["snapshot_gib"] = round(eng.prefix_cache.snapshots.memory_bytes() / GiB, 2) \
            if caching else 0.0
        del eng
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    same_tokens = all(a[0] == b[0] for a, b in zip(probes["cache"], probes["no-cache"]))
    # log-probs compared up to the first differing token (after it the two runs condition on different text)
    diffs = []
    for (ta, la), (tb, lb) in zip(probes["cache"], probes["no-cache"]):
        for x, y, u, v in zip(ta, tb, la, lb):
            diffs.append(abs(u - v))
            if x != y:
                break
    max_dlp = max(diffs)
    cols = ("requests", "ttft_ms_p50", "ttft_ms_p99", "req_s", "output_tok_s", "prompt_tok_s", "cached_prompt_frac",
            "evicted_blocks", "evicted_snapshots")
    print(f"\n{args.preset} shape, random bf16 weights, {card}, numerics={args.numerics}, async_scheduling="
          f"{async_scheduling}; closed-loop clients, "
          "greedy, ignore_eos")
    print("| workload | prefix cache | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for (name, mode), r in results.items():
        print(f"| {name} | {mode} | " + " | ".join(str(r[c]) for c in cols) + " |")
    speedup = {name: round(results[(name, "no-cache")]["ttft_ms_p50"] / results[(name, "cache")]["ttft_ms_p50"], 2)
               for name in ("shared", "chat")}
    print(f"TTFT p50 speedup: shared {speedup['shared']}x (target >= 5x), chat {speedup['chat']}x; probes: same "
          f"greedy tokens {same_tokens}, max |dlogprob| {max_dlp:.3g}")
    print(json.dumps({"bench": "serve_gpu", "card": card, "preset": args.preset, "date": time.strftime("%Y-%m-%d"),
                      "args": vars(args),
                      "results": {f"{n}/{m}": r for (n, m), r in results.items()},
                      "ttft_p50_speedup": speedup, "target_met": speedup["shared"] >= 5.0,
                      "probe_same_tokens": same_tokens, "probe_max_abs_dlogprob": max_dlp}))


if __name__ == "__main__":
    main()
