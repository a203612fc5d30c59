"""One run of the grid: its spec (OUT/runs/ID/run.json), its execution with the ringlinear Trainer, and its result.

A run is done when OUT/runs/ID/result.json exists for the same spec; it is skipped then. An interrupted run resumes
from its last checkpoint (the Trainer's exact `--resume auto`); a run that never saved starts over. After the result
is written the checkpoints are deleted (they exist only for resuming); `final/` keeps the model.

Several runs at once: `--jobs N` worker processes (spawned), each taking the next run from a queue; on CUDA
each worker gets one of the visible GPUs in turn (several workers share a GPU when N exceeds the GPU count).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import sys
import time
import traceback

log = logging.getLogger("ringlinear.sweep")

RESULT, SPEC, ERROR = "result.json", "run.json", "error.txt"


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def identity(spec: dict) -> dict:
    """What makes two specs the same run: all but whether retrieval is scored (a grid that grows a budget moves it)."""
    return {k: v for k, v in spec.items() if k != "retrieval"}


def status(run_dir: str, spec: dict) -> str:
    """'done', 'eval' (trained, retrieval missing), 'partial' (has a checkpoint) or 'new'."""
    from ..train.checkpoint import list_checkpoints
    rp = os.path.join(run_dir, RESULT)
    if os.path.exists(rp):
        res = read_json(rp)
        if identity(res.get("spec", {})) == identity(spec):
            return "eval" if spec["retrieval"] and res.get("retrieval") is None else "done"
    return "partial" if list_checkpoints(os.path.join(run_dir, "checkpoints")) else "new"


def prepare_dir(run_dir: str, spec: dict) -> None:
    """Write the run's spec; a stale result of another spec (the grid's recipe changed) is removed."""
    os.makedirs(run_dir, exist_ok=True)
    sp = os.path.join(run_dir, SPEC)
    if os.path.exists(sp) and identity(read_json(sp)) != identity(spec):
        for name in (RESULT, "checkpoints", "final", "metrics.jsonl"):
            p = os.path.join(run_dir, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
    write_json(sp, spec)
    write_json(os.path.join(run_dir, "model_config.json"), spec["model"])


def _train_loss(metrics_path: str, last_fraction: float = 0.1) -> float | None:
    """Mean training loss over the last 10% of steps (one step's loss is noisy)."""
    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path) as f:
        losses = [r["loss"] for r in map(json.loads, filter(str.strip, f)) if "loss" in r]
    if not losses:
        return None
    k = max(1, int(len(losses) * last_fraction))
    return sum(losses[-k:]) / k


def execute(run_dir: str, device: str, threads: int, eval_path: str) -> dict:
    """Train (or resume, or only evaluate) one run; writes and returns its result."""
    import torch

    from ..train.checkpoint import list_checkpoints
    from ..train.trainer import Trainer
    from .corpus import load_eval_set
    from .plan import train_config
    from .retrieval import evaluate_model
    spec = read_json(os.path.join(run_dir, SPEC))
    st = status(run_dir, spec)
    if st == "done":
        return read_json(os.path.join(run_dir, RESULT))
    items = load_eval_set(eval_path) if spec["retrieval"] else None
    log_path = os.path.join(run_dir, "train.log")
    if st == "eval":  # trained by an earlier sweep whose largest budget was smaller: score the saved model
        from ..models.modeling import RingLinearForCausalLM
        res = read_json(os.path.join(run_dir, RESULT))
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           "cpu" if device == "auto" else device)
        model = RingLinearForCausalLM.from_pretrained(os.path.join(run_dir, "final"), dtype=torch.float32).to(dev)
        amp = dev.type == "cuda"
        res["retrieval"] = evaluate_model(model, items, lambda: torch.autocast(dev.type, torch.bfloat16, enabled=amp))
        res["spec"] = spec
        write_json(os.path.join(run_dir, RESULT), res)
        return res
    tc = train_config(os.path.dirname(os.path.dirname(run_dir)), spec).replace(device=device, threads=threads)
    has_ckpt = bool(list_checkpoints(os.path.join(run_dir, "checkpoints")))
    tc = tc.replace(resume="auto") if has_ckpt else tc.replace(overwrite=True)
    t0 = time.perf_counter()
    with open(log_path, "a") as logf, contextlib.redirect_stdout(logf), _train_log_to(logf):
        tr = Trainer(tc)
        summary = tr.train()
        if summary["step"] != spec["steps"]:
            raise RuntimeError(f"training stopped at step {summary['step']} of {spec['steps']} (its checkpoint "
                               "is kept: the next sweep resumes it)")
        val = summary["val_loss_end"] if summary["val_loss_end"] is not None else tr.evaluate()
        retrieval = evaluate_model(tr.model, items, tr.autocast) if items is not None else None
    res = {"spec": spec, "id": spec["id"], "val_loss": val, "train_loss": _train_loss(
        os.path.join(run_dir, "metrics.jsonl")), "val_loss_start": summary["val_loss_start"],
        "steps": summary["step"], "tokens": spec["steps"] * spec["tokens_per_step"],
        "flops": spec["flops"], "seconds": time.perf_counter() - t0, "train_seconds": tr.elapsed,
        "tokens_per_s": summary["tokens_per_s"], "resumed_from_step": summary["step"] - summary["steps_run"]
        if has_ckpt else None, "device": str(tr.env.device), "retrieval": retrieval}
    if tr.env.device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(tr.env.device)
        res["peak_gib"] = torch.cuda.max_memory_allocated(tr.env.device) / 2 ** 30
    write_json(os.path.join(run_dir, RESULT), res)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    if os.path.exists(os.path.join(run_dir, ERROR)):  # from an earlier, failed attempt
        os.remove(os.path.join(run_dir, ERROR))
    return res


@contextlib.contextmanager
def _train_log_to(f):
    """The Trainer's log lines go to the run's train.log, not the sweep's terminal."""
    lg = logging.getLogger("ringlinear.train")
    h = logging.StreamHandler(f)
    h.setFormatter(logging.Formatter("%(message)s"))
    old = lg.propagate
    lg.addHandler(h)
    lg.propagate = False
    try:
        yield
    finally:
        lg.removeHandler(h)
        lg.propagate = old


# ---------------------------------------------------------------------- several runs
def worker_devices(device: str, jobs: int) -> list[str]:
    """The device of each worker: CPU for all, or the visible GPUs round robin."""
    import torch
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return ["cpu"] * jobs
    if device.startswith("cuda:"):
        return [device] * jobs
    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError("--device cuda but CUDA is not available")
    return [f"cuda:{i % n}" for i in range(jobs)]


def _worker(device: str, threads: int, eval_path: str, tasks, results) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    while True:
        run_dir = tasks.get()
        if run_dir is None:
            return
        try:
            results.put(("ok", run_dir, execute(run_dir, device, threads, eval_path)))
        except Exception as e:  # reported by the parent; the worker takes the next run
            with open(os.path.join(run_dir, ERROR), "w") as f:
                traceback.print_exc(file=f)
            results.put(("error", run_dir, f"{type(e).__name__}: {e}"))


class Pace:
    """How long a run should take: its tokens at the speed of the last finished run of the same ratio and size in
    this invocation, plus that run's fixed cost (setup, evaluation). None before any such run has finished."""

    def __init__(self):
        self.seen: dict = {}

    def learn(self, spec: dict, res: dict) -> None:
        if res.get("train_seconds"):
            self.seen[(spec["ratio"], spec["size"])] = (res["tokens"] / res["train_seconds"],
                                                        res["seconds"] - res["train_seconds"])

    def expect(self, spec: dict) -> float | None:
        r = self.seen.get((spec["ratio"], spec["size"]))
        return None if r is None else spec["steps"] * spec["tokens_per_step"] / r[0] + r[1]


def _take(pending: list, deadline: float | None, pace: Pace):
    """The first pending run that can still finish before the deadline (all of them without one)."""
    if not pending or deadline is None:
        return pending.pop(0) if pending else None
    now = time.monotonic()
    for i, (_, spec) in enumerate(pending):
        t = pace.expect(spec)
        if now < deadline and (t is None or now + t <= deadline):
            return pending.pop(i)
    return None


def run_all(runs: list[tuple[str, dict]], device: str, jobs: int, threads: int, eval_path: str,
            deadline: float | None, on_result) -> list:
    """Execute (run_dir, spec) pairs in order (smallest budgets first), `jobs` at a time with `threads` CPU threads
    each (0: the cores shared out; more threads than cores makes torch's CPU kernels spin against each other).
    on_result(run_dir, result | None, error) is called as each finishes. With a deadline (time.monotonic()), a run
    starts only if it is expected to finish by then (Pace); returns the runs not started."""
    pending, pace = list(runs), Pace()
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)

    def finished(rd, spec, res, err):
        if res is not None:
            pace.learn(spec, res)
        on_result(rd, res, err)
    if jobs == 1:
        dev = worker_devices(device, 1)[0]
        while (job := _take(pending, deadline, pace)) is not None:
            rd, spec = job
            try:
                res = execute(rd, dev, threads, eval_path)
            except Exception as e:  # one failed run does not stop the grid; the traceback goes to its error.txt
                with open(os.path.join(rd, ERROR), "w") as f:
                    traceback.print_exc(file=f)
                finished(rd, spec, None, f"{type(e).__name__}: {e}")
            else:
                finished(rd, spec, res, None)
        return pending
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(d, threads, eval_path, tasks, results), daemon=True)
             for d in worker_devices(device, jobs)]
    for p in procs:
        p.start()
    specs = dict(runs)
    running: set = set()  # handed to a worker, not finished
    try:
        while len(running) < jobs and (job := _take(pending, deadline, pace)) is not None:
            tasks.put(job[0])
            running.add(job[0])
        while running:
            try:
                kind, rd, payload = results.get(timeout=5.0)
            except queue.Empty:
                if not all(p.is_alive() for p in procs):
                    raise RuntimeError("a sweep worker process died (out of memory?); run the sweep again to "
                                       "continue") from None
                continue
            running.discard(rd)
            finished(rd, specs[rd], payload if kind == "ok" else None, payload if kind == "error" else None)
            if (job := _take(pending, deadline, pace)) is not None:
                tasks.put(job[0])
                running.add(job[0])
    finally:
        for _ in procs:
            tasks.put(None)
        for p in procs:
            p.join(timeout=10 if sys.exc_info()[0] is None else 0)
            if p.is_alive():
                p.terminate()
                p.join()
    return pending
