"""RL plots: `reward.png` (reward and response length per step) and `mismatch.png` (the four mismatch figures)."""
from __future__ import annotations

import os

from ..train.report import read_metrics
from .metrics import MISMATCH_KEYS


def _ema(ys, a=0.9):
    out, e = [], None
    for y in ys:
        e = y if e is None else a * e + (1 - a) * y
        out.append(e)
    return out


def _save(fig, plt, png_path: str) -> str:
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_reward(metrics_path: str, png_path: str, title: str) -> str | None:
    recs = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    if not recs:
        return None
    plt = _plt()
    xs = [r["step"] for r in recs]
    mean = [r["reward_mean"] for r in recs]
    std = [r["reward_std"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color="#c6dbef",
                    alpha=0.5, lw=0, label="± std over samples")
    ax.plot(xs, mean, color="#6baed6", lw=0.9, label="reward (per step)")
    ax.plot(xs, _ema(mean), color="#08519c", lw=1.8, label="reward (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [r["response_len"] for r in recs], color="#d94801", lw=1.0, alpha=0.7, label="response length")
    ax2.set_ylabel("response length (tokens)", color="#d94801")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    return _save(fig, plt, png_path)


def plot_mismatch(metrics_path: str, png_path: str, title: str) -> str | None:
    recs = [r for r in read_metrics(metrics_path) if MISMATCH_KEYS[0] in r]
    if not recs:
        return None
    plt = _plt()
    xs = [r["step"] for r in recs]
    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5), dpi=120, sharex=True)
    for ax, key in zip(axes.flat, MISMATCH_KEYS):
        ys = [r[key] for r in recs]
        ax.plot(xs, ys, color="#54278f", lw=1.2)
        pos = [y for y in ys if y > 0]
        if len(pos) == len(ys):
            ax.set_yscale("log")
        elif pos:  # some exact zeros (aligned numerics): symlog keeps them on the plot next to values of 1e-7
            ax.set_yscale("symlog", linthresh=min(pos))
        else:
            ax.set_ylim(-0.05, 1.0)
        ax.set_title(key + ("  (0 at every step)" if not pos else ""), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, png_path)
