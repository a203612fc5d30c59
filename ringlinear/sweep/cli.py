"""`ringlinear sweep`: flags, the plan, and the order of work (corpus -> tokenizer -> runs -> fits -> report)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from .retrieval import RetrievalSpec

log = logging.getLogger("ringlinear.sweep")

# The recipe: every run of a sweep shares it, and a sweep directory keeps it (OUT/sweep.json). The grid (ratios,
# sizes, budgets) may grow between invocations; the recipe may not.
DEFAULTS = dict(ratios="softmax,1,3,7,linear", sizes="5M,20M,60M", budgets="1e15,3e15,1e16", seq_len=1024,
                batch_size=32, grad_accum=1, lr=2e-3, vocab_size=4096, bpe_sample_mb=8.0, eval_rows=64,
                min_steps=20, retrieval_fraction=0.1, corpus_mb=0.0, seed=0, depth=0)
QUICK = dict(DEFAULTS, ratios="softmax,3", sizes="0.2M,0.5M", budgets="6e10,1.5e11", seq_len=128, batch_size=8,
             lr=3e-3, vocab_size=512, bpe_sample_mb=1.0, eval_rows=16, min_steps=10)
QUICK_RETRIEVAL = dict(train_kv_max=8, eval_kv=[4, 8, 16], mqar_lengths=[1.0, 2.0], passkey_lengths=[1.0, 2.0],
                       depths=[0.1, 0.5, 0.9], mqar_docs=4, passkey_docs=2)
FIXED = dict(min_lr_ratio=0.1, warmup_frac=0.1, weight_decay=0.1, val_fraction=0.02, group_rows=8)
RECIPE = ("data", "seed", "seq_len", "batch_size", "grad_accum", "lr", "vocab_size", "bpe_sample_mb", "eval_rows",
          "retrieval", "depth", "corpus_mb", "quick") + tuple(FIXED)

_EPILOG = """examples:
  ringlinear sweep --quick --out runs/sweep-quick          # CPU: 2 ratios x 2 tiny sizes, ~1 minute
  ringlinear sweep --data /usr/lib/python3*/ --out runs/sweep --jobs 4 --stop-after 540
  ringlinear sweep --out runs/sweep --report-only          # tables, fits, plots of what has finished
Run the same command again to continue a stopped or killed sweep: finished runs are skipped, interrupted ones resume
from their last checkpoint. docs/sweep.md describes the method.
"""


def register(sub) -> None:
    p = sub.add_parser("sweep", help="the hybrid-ratio study: loss vs FLOPs per linear:softmax ratio, retrieval",
                       description="Train a grid of parameter-matched models (ratios x sizes x FLOP budgets), fit "
                                   "L(C) = a C^-b + e per ratio, score MQAR and passkey retrieval, and report which "
                                   "of the paper's claims reproduce.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--ratios", help=f"M = linear layers per softmax layer; 'softmax', 'linear' (default {d['ratios']})")
    p.add_argument("--sizes", help=f"active non-embedding parameters per size (default {d['sizes']})")
    p.add_argument("--budgets", help=f"training FLOPs per run (default {d['budgets']})")
    p.add_argument("--out", default="runs/sweep", help="sweep directory (default runs/sweep)")
    p.add_argument("--quick", action="store_true", help="CPU smoke sweep: " + ", ".join(
        f"{k} {QUICK[k]}" for k in ("ratios", "sizes", "budgets", "seq_len")))
    p.add_argument("--data", nargs="*", action="extend", metavar="PATH",
                   help="corpus files, directories or globs, repeatable (default: this Python's standard-library "
                        "sources)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time, one process each; on CUDA spread over "
                                                          "the visible GPUs, several per GPU when N exceeds them "
                                                          "(default 1; --quick 2)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per run (default: cores / jobs)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.add_argument("--stop-after", type=float, default=0, metavar="S",
                   help="start no run that would not finish within S seconds of the start (estimated from the "
                        "finished runs of the same ratio and size); the report covers what finished (0 = no limit)")
    p.add_argument("--dry-run", action="store_true", help="print the grid (shapes, parameters, steps, FLOPs) and exit")
    p.add_argument("--report-only", action="store_true", help="no training: fits, plots and report of finished runs")
    for k in ("seq_len", "batch_size", "grad_accum", "lr", "vocab_size", "bpe_sample_mb", "eval_rows", "min_steps",
              "retrieval_fraction", "corpus_mb", "seed", "depth"):
        p.add_argument("--" + k.replace("_", "-"), type=type(d[k]), default=None,
                       help=_HELP[k] + f" (default {d[k]}; --quick {QUICK[k]})")
    p.set_defaults(func=cmd_sweep)


_HELP = {"seq_len": "tokens per training row", "batch_size": "rows per micro-batch",
         "grad_accum": "micro-batches per step", "lr": "peak learning rate of every run",
         "vocab_size": "BPE vocabulary", "bpe_sample_mb": "MB of text the BPE learns from",
         "eval_rows": "held-out rows for the validation loss", "min_steps": "runs with fewer steps are left out",
         "retrieval_fraction": "share of training characters that are synthetic retrieval documents",
         "corpus_mb": "natural text to read (0 = what the largest run needs)", "seed": "seed of every run",
         "depth": "layers of every size (0 = by size, at least the largest group)"}


# ---------------------------------------------------------------------- settings
def resolve_settings(args) -> dict:
    base = QUICK if args.quick else DEFAULTS
    s = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    s.update(FIXED, data=list(args.data or []), quick=bool(args.quick))
    for k, lo in (("seq_len", 16), ("batch_size", 1), ("grad_accum", 1), ("vocab_size", 64), ("eval_rows", 1),
                  ("min_steps", 1)):
        if s[k] < lo:
            raise ValueError(f"--{k.replace('_', '-')} must be >= {lo}, got {s[k]}")
    if not s["lr"] > 0 or s["bpe_sample_mb"] <= 0 or s["corpus_mb"] < 0 or s["depth"] < 0:
        raise ValueError("--lr and --bpe-sample-mb must be > 0, --corpus-mb and --depth >= 0")
    if not 0 <= s["retrieval_fraction"] <= 0.5:
        raise ValueError(f"--retrieval-fraction must be in [0, 0.5], got {s['retrieval_fraction']}")
    if args.jobs is None:
        args.jobs = min(2, os.cpu_count() or 1) if args.quick else 1
    if args.jobs < 1 or args.threads < 0:
        raise ValueError(f"--jobs must be >= 1 and --threads >= 0, got {args.jobs} and {args.threads}")
    if args.stop_after < 0:
        raise ValueError("--stop-after must be >= 0")
    if args.device not in ("auto", "cpu", "cuda") and not (args.device.startswith("cuda:")
                                                           and args.device[5:].isdigit()):
        raise ValueError(f"--device {args.device!r}: use auto, cpu, cuda or cuda:N")
    spec = RetrievalSpec(fraction=s.pop("retrieval_fraction"), **(QUICK_RETRIEVAL if args.quick else {}))
    s["retrieval"] = spec.to_dict()
    return s


def check_recipe(out: str, s: dict) -> None:
    p = os.path.join(out, "sweep.json")
    if os.path.exists(p):
        with open(p) as f:
            old = json.load(f)
        diff = [k for k in RECIPE if old.get(k) != s.get(k)]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {s.get(k)!r}" for k in diff)
            raise ValueError(f"{out} holds a sweep with another recipe ({changes}); use another --out")




# ---------------------------------------------------------------------- the command
def cmd_sweep(args) -> int:
    from ..train.data import resolve_inputs
    from .corpus import CHARS_PER_TOKEN, build_corpus, eval_set, load_corpus_stats, prepare_shared
    from .grid import parse_budgets, parse_ratios, parse_sizes
    from .plan import plan, print_plan, train_config
    from .runs import prepare_dir, write_json
    out = os.path.abspath(args.out)
    if args.report_only:
        return _report(out, *_saved_plan(out))
    s = resolve_settings(args)
    ratios, sizes, budgets = parse_ratios(s["ratios"]), parse_sizes(s["sizes"]), parse_budgets(s["budgets"])
    s.update(ratios=[r.label for r in ratios], sizes=[x for x, _ in sizes], budgets=[b for b, _ in budgets])
    resolve_inputs(s["data"])  # a bad --data fails here, before anything is written
    check_recipe(out, s)
    specs, skipped = plan(s, ratios, sizes, budgets, s["vocab_size"], None)
    if not specs:
        raise ValueError(f"every run has fewer than --min-steps {s['min_steps']} steps: raise --budgets or choose "
                         "smaller --sizes")
    if args.dry_run:
        print_plan(specs, skipped)
        return 0
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "sweep.json"), s)
    logging.getLogger("ringlinear.train").setLevel(logging.INFO if args.verbose else logging.WARNING)
    t0 = time.monotonic()
    corpus_dir = os.path.join(out, "corpus")
    stats = load_corpus_stats(corpus_dir)
    if stats is None:
        need = max(max(x["steps"] * x["tokens_per_step"] for x in specs) * (1 + 2 * s["val_fraction"]),
                   1.5 * s["eval_rows"] * s["seq_len"] / s["val_fraction"])
        max_chars = s["corpus_mb"] * 1e6 or need * CHARS_PER_TOKEN * 1.1
        stats = build_corpus(s["data"], corpus_dir, s["seed"], max_chars,
                             int(s["group_rows"] * s["seq_len"] * CHARS_PER_TOKEN), RetrievalSpec(**s["retrieval"]),
                             s["seq_len"])
    shared = prepare_shared(train_config(out, specs[0]).replace(out=out))
    data = {**stats, **shared}
    write_json(os.path.join(out, "data.json"), data)
    specs, skipped = plan(s, ratios, sizes, budgets, shared["vocab"], shared["mean_keys"])
    most = max(x["steps"] * x["tokens_per_step"] for x in specs)
    if most > shared["train_tokens"]:
        log.warning("the largest run reads %.1fM tokens of a %.1fM-token training split: it sees data %.1f times",
                    most / 1e6, shared["train_tokens"] / 1e6, most / shared["train_tokens"])
    eval_path = eval_set(out, shared["tokenizer_dir"], s["seq_len"], RetrievalSpec(**s["retrieval"]), s["seed"])
    for x in specs:
        prepare_dir(os.path.join(out, "runs", x["id"]), x)
    deadline = t0 + args.stop_after if args.stop_after else None
    failed = _execute(out, specs, args, eval_path, deadline)
    return _report(out, s, data, specs, skipped, failed=failed)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # so that `timeout` or a kill ends the worker processes too (runs.run_all's finally)


def _execute(out, specs, args, eval_path, deadline) -> dict:
    from .runs import run_all, status
    todo = [x for x in specs if status(os.path.join(out, "runs", x["id"]), x) != "done"]
    log.info("%d runs in the grid: %d finished earlier, %d to run (%s)", len(specs), len(specs) - len(todo),
             len(todo), ", ".join(f"{sum(status(os.path.join(out, 'runs', x['id']), x) == k for x in todo)} {k}"
                                  for k in ("new", "partial", "eval")))
    bar = None
    if args.progress and sys.stderr.isatty() and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="run", dynamic_ncols=True, file=sys.stderr)
    failed: dict = {}

    def on_result(run_dir, res, err):
        rid = os.path.basename(run_dir)
        if err is not None:
            failed[rid] = err
            msg = f"FAILED {rid}: {err} (traceback in {os.path.join(run_dir, 'error.txt')})"
        else:
            msg = (f"done {rid}: val loss {res['val_loss']:.4f} after {res['steps']} steps, {res['seconds']:.0f} s"
                   + (f" (resumed at step {res['resumed_from_step']})" if res.get("resumed_from_step") else ""))
        if bar is not None:
            bar.write(msg, file=sys.stderr)
            bar.update(1)
        else:
            print(msg, file=sys.stderr, flush=True)
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        left = run_all([(os.path.join(out, "runs", x["id"]), x) for x in todo], args.device, args.jobs,
                       args.threads, eval_path, deadline, on_result)
    finally:
        signal.signal(signal.SIGTERM, old)
        if bar is not None:
            bar.close()
    if left:
        print(f"--stop-after: {len(left)} runs not started (they would not finish in time); run the same command "
              "again to continue", file=sys.stderr)
    return failed


def _saved_plan(out: str):
    from .grid import parse_budgets, parse_ratios, parse_sizes
    from .plan import plan
    paths = [os.path.join(out, n) for n in ("sweep.json", "data.json")]
    if not all(os.path.exists(p) for p in paths):
        raise ValueError(f"{out} has no prepared sweep (sweep.json, data.json): run the sweep first")
    s, data = (json.load(open(p)) for p in paths)
    specs, skipped = plan(s, parse_ratios(",".join(s["ratios"])), parse_sizes(",".join(s["sizes"])),
                          parse_budgets(",".join(s["budgets"])), data["vocab"], data["mean_keys"])
    return s, data, specs, skipped


def _report(out, s, data, specs, skipped, failed=None) -> int:
    from .report import build_results, write_all
    from .runs import RESULT, read_json, status
    results = []
    for x in specs:
        rd = os.path.join(out, "runs", x["id"])
        if status(rd, x) in ("done", "eval"):
            results.append(read_json(os.path.join(rd, RESULT)))
    failed = failed or {}
    res = build_results({**s, "skipped": skipped}, data, specs, results, failed)
    paths = write_all(out, res)
    for c in res["claims"]:
        print(f"{c['verdict']:>18s}: {c['claim']}")
    print(f"{len(results)}/{len(specs)} runs -> {paths['report']}, {paths['results']}"
          + (f", {paths['loss_plot']}" if paths.get("loss_plot") else ""))
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
