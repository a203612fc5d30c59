"""What a run shows: progress (tqdm on a terminal, plain lines otherwise), `metrics.jsonl`, `loss.png`, a summary."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger("ringlinear.train")


class MetricsLog:
    """Append-only JSON lines. On resume the lines of steps after the resumed step are dropped first, so the file
    describes one consistent run."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            keep = [ln for ln in _read_lines(path) if json.loads(ln).get("step", 0) <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(ln + "\n" for ln in keep)
            os.replace(tmp, path)
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, sort_keys=True) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _read_lines(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def read_metrics(path: str) -> list[dict]:
    return [json.loads(ln) for ln in _read_lines(path)]


class Progress:
    """tqdm bar (loss, tok/s, lr; ETA from tqdm) when stderr is a terminal, else a log line every ~5% of the run."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar = None
        self.every = max(1, (total - initial) // 20)
        self.t0, self.s0 = time.perf_counter(), initial
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1,
                            file=sys.stderr)

    def update(self, step: int, loss: float, tok_s: float, lr: float) -> None:
        self.advance(step, f"loss {loss:.4f} | {_si(tok_s)} tok/s | lr {lr:.2e}")

    def advance(self, step: int, postfix: str) -> None:
        """One step done; `postfix` (fields separated by ' | ') goes on the bar or the log line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            done = step - self.s0
            el = time.perf_counter() - self.t0
            eta = el / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {postfix.replace(' | ', '  ')}  elapsed {_hms(el)}  eta {_hms(eta)}",
                  file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _si(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plot_losses(metrics_path: str, png_path: str, title: str) -> str | None:
    """Train loss (raw and smoothed) and validation loss against step. Returns the path, or None without data."""
    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not tr and not va:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if tr:
        xs, ys = zip(*tr)
        ax.plot(xs, ys, color="#9ecae1", lw=0.8, label="train (per step)")
        ema, sm = None, []
        for y in ys:
            ema = y if ema is None else 0.9 * ema + 0.1 * y
            sm.append(ema)
        ax.plot(xs, sm, color="#08519c", lw=1.6, label="train (EMA 0.9)")
    if va:
        xs, ys = zip(*va)
        ax.plot(xs, ys, "o-", color="#d94801", lw=1.4, ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def summary_line(s: dict) -> str:
    v0, v1 = s.get("val_loss_start"), s.get("val_loss_end")
    val = (f"val loss {v0:.3f} -> {v1:.3f} (ppl {math.exp(min(v1, 50)):.1f})" if v0 is not None and v1 is not None
           else "no validation")
    return (f"trained {s['params'] / 1e6:.2f}M params ({s['layout']}) for {s['steps_run']} steps "
            f"({s['step']}/{s['total_steps']}), {s['tokens'] / 1e6:.2f}M tokens in {_hms(s['seconds'])} "
            f"({_si(s['tokens_per_s'])} tok/s x {s['world_size']} proc); train loss {s['loss_end']:.3f}; {val}; "
            f"model -> {s['model_dir']}")
