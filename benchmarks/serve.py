"""Serving benchmark: N concurrent streaming clients against a live OpenAI-compatible server.

    python benchmarks/serve.py --model runs/demo --num-clients 16 --num-requests 64   # starts `ringlinear serve`
    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-clients 64      # an already running server

Each request sends a random token-id prompt (length drawn from --prompt-len) and asks for exactly --output-len
tokens (ignore_eos), streaming. Reports request throughput, output tokens/s, time to first token (TTFT) and time
per output token after the first (TPOT), median and p99, as a table and then one JSON line.

Baseline (`--baseline`, with --model): the same requests through `ringlinear.generate()` one at a time in this
process (no batching, no server), on the device the server used; the JSON line then carries the ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time


def _range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client, url, model, headers, prompt, n_out):
    body = {"model": model, "prompt": prompt, "max_tokens": n_out, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("choices"):
                now = time.perf_counter()
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first - t0, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None,
            "latency": last - t0, "tokens": tokens, "prompt": len(prompt)}


async def run(args, url, model, work):
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for w in work:
        queue.put_nowait(w)
    results, errors = [], []
    limits = httpx.Limits(max_connections=args.num_clients + 4)

    async def worker(client):
        while not queue.empty():
            prompt, n = queue.get_nowait()
            try:
                results.append(await one_request(client, url, model, headers, prompt, n))
            except Exception as e:  # noqa: BLE001  (counted and reported, the run goes on)
                errors.append(repr(e))

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        if args.warmup:
            await one_request(client, url, model, headers, work[0][0], 4)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(args.num_clients)))
        wall = time.perf_counter() - t0
    return results, errors, wall


def summarize(results, errors, wall, args):
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    out_tokens = sum(r["tokens"] for r in results)
    return {
        "clients": args.num_clients, "requests": len(results), "errors": len(errors), "wall_s": round(wall, 3),
        "request_throughput_rps": round(len(results) / wall, 3), "output_tok_s": round(out_tokens / wall, 1),
        "prompt_tokens": sum(r["prompt"] for r in results), "output_tokens": out_tokens,
        "ttft_ms_median": round(1e3 * statistics.median(ttft), 2) if ttft else None,
        "ttft_ms_p99": round(1e3 * _pct(ttft, 99), 2) if ttft else None,
        "tpot_ms_median": round(1e3 * statistics.median(tpot), 2) if tpot else None,
        "tpot_ms_p99": round(1e3 * _pct(tpot, 99), 2) if tpot else None,
        "prompt_len": list(args.prompt_len), "output_len": list(args.output_len),
    }


def run_baseline(args, work):
    """Output tok/s of plain generate(), one request after another (same prompts and lengths)."""
    import torch

    from ringlinear.generation import generate
    from ringlinear.models.modeling import RingLinearForCausalLM
    if args.baseline_threads:
        torch.set_num_threads(args.baseline_threads)
    device = args.baseline_device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = RingLinearForCausalLM.from_pretrained(args.model, dtype="auto", device=device)
    generate(model, [work[0][0]], max_new_tokens=2, temperature=0, stop_token_ids=[])  # warm-up
    t0 = time.perf_counter()
    n = 0
    for prompt, out_len in work:
        n += len(generate(model, [prompt], max_new_tokens=out_len, temperature=0, stop_token_ids=[]).sequences[0])
    return n / (time.perf_counter() - t0)


def make_work(args):
    rng = random.Random(args.seed)
    return [([rng.randrange(10, 250) for _ in range(rng.randint(*args.prompt_len))], rng.randint(*args.output_len))
            for _ in range(args.num_requests)]


def start_server(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ringlinear", "serve", "--model", args.model, "--port", str(port),
           *args.server_args]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if not args.server_log else None, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not come up in 300 s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="checkpoint dir: start `ringlinear serve` on a free loopback port")
    p.add_argument("--served-model-name", default=None, help="model id (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("RINGLINEAR_API_KEY"))
    p.add_argument("--num-clients", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=None, help="default: 4 per client")
    p.add_argument("--prompt-len", type=_range, default=(16, 256), help="lo:hi tokens (uniform)")
    p.add_argument("--output-len", type=_range, default=(16, 128), help="lo:hi tokens (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--server-log", action="store_true", help="show the started server's log")
    p.add_argument("--baseline", action="store_true", help="also time sequential generate() (needs --model)")
    p.add_argument("--baseline-device", default=None, help="device for the baseline (default: cuda if available)")
    p.add_argument("--baseline-threads", type=int, default=None, help="torch CPU threads for the baseline")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: extra `ringlinear serve` flags")
    args = p.parse_args(argv)
    args.server_args = [a for a in args.server_args if a != "--"]
    args.num_requests = args.num_requests or 4 * args.num_clients
    if args.baseline and not args.model:
        p.error("--baseline needs --model")
    work = make_work(args)

    proc = None
    if args.model:
        proc, url = start_server(args)
    else:
        url = args.base_url.rstrip("/").removesuffix("/v1")
    try:
        import httpx
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.served_model_name or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        results, errors, wall = asyncio.run(run(args, url, model, work))
    finally:
        if proc is not None:
            proc.send_signal(2)  # SIGINT: the server drains and exits
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    s = summarize(results, errors, wall, args)
    if args.baseline:
        s["baseline_generate_output_tok_s"] = round(run_baseline(args, work), 1)
        s["speedup_vs_generate"] = round(s["output_tok_s"] / s["baseline_generate_output_tok_s"], 2)
    rows = [("requests", f"{s['requests']} ok, {s['errors']} failed, {s['clients']} concurrent clients"),
            ("prompt / output tokens", f"{s['prompt_tokens']} / {s['output_tokens']}"),
            ("wall time", f"{s['wall_s']:.2f} s"),
            ("request throughput", f"{s['request_throughput_rps']:.2f} req/s"),
            ("output throughput", f"{s['output_tok_s']:.1f} tok/s"),
            ("TTFT median / p99", f"{s['ttft_ms_median']} / {s['ttft_ms_p99']} ms"),
            ("TPOT median / p99", f"{s['tpot_ms_median']} / {s['tpot_ms_p99']} ms")]
    if args.baseline:
        rows.append(("sequential generate()", f"{s['baseline_generate_output_tok_s']:.1f} tok/s "
                                              f"(engine: {s['speedup_vs_generate']:.2f}x)"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    for e in errors[:5]:
        print("error:", e, file=sys.stderr)
    print(json.dumps(s))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
