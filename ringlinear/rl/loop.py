"""The step loop around a set-up `RLTrainer`: metrics.jsonl, progress, checkpoints, the final model, plots, summary."""
from __future__ import annotations

import json
import logging
import math
import os
import time

from ..train.report import MetricsLog, Progress
from .config import dump
from .report import plot_mismatch, plot_reward

log = logging.getLogger("ringlinear.rl")


def _postfix(rec: dict) -> str:
    s = f"reward {rec['reward_mean']:.3f} | len {rec['response_len']:.0f}"
    if "max_abs_dlogp" in rec:
        s += f" | max|dlogp| {rec['max_abs_dlogp']:.1e}"
    return s + f" | {rec['rollout_tok_s']:.0f} rollout tok/s"


def run(tr) -> dict:
    cfg, env = tr.cfg, tr.env
    main = env.is_main
    out = cfg.out
    resumed_from = tr.step if tr.resume_path else None
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), resumed_from) if main else None
    if main:
        with open(os.path.join(out, "rl_config.json"), "w") as f:
            f.write(dump(cfg) + "\n")
        n = sum(p.numel() for p in tr.policy.parameters())
        log.info("rl: %.2fM-param policy from %s, task %s, %d prompts x %d samples per step, numerics %s, old "
                 "log-probs %s, device %s%s", n / 1e6, cfg.model, cfg.task, cfg.prompts_per_step, cfg.group_size,
                 cfg.numerics, cfg.old_logprobs, env.device,
                 f", resuming at step {tr.step}" if resumed_from is not None else "")
    progress = Progress(cfg.steps, tr.step, main and cfg.progress)
    first, t_run = tr.step, time.perf_counter()
    rewards, saved_at = [], None
    try:
        while tr.step < cfg.steps:
            rec = tr.run_step()
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"the loss is {rec['loss']} at step {tr.step}: lower --lr")
            rewards.append(rec["reward_mean"])
            if main:
                metrics.write(rec)
                progress.advance(tr.step, _postfix(rec))
            if cfg.save_every and tr.step % cfg.save_every == 0 and tr.step < cfg.steps:
                tr.save()
                saved_at = tr.step
    finally:
        progress.close()
    if saved_at != tr.step and tr.step > first:
        tr.save()
    final = os.path.join(out, "final")
    if main and tr.step == cfg.steps:
        tr.policy.save_pretrained(final, tokenizer_dir=cfg.model)
    seconds = time.perf_counter() - t_run
    k = max(1, len(rewards) // 10)  # first and last tenth of this invocation's steps
    summary = {"task": cfg.task, "numerics": cfg.numerics, "step": tr.step, "total_steps": cfg.steps,
               "steps_run": tr.step - first, "seconds": seconds,
               "reward_first": sum(rewards[:k]) / k if rewards else None,
               "reward_last": sum(rewards[-k:]) / k if rewards else None,
               "model_dir": final if tr.step == cfg.steps else os.path.join(out, "checkpoints")}
    if main:
        metrics.close()
        if cfg.plot:
            try:
                mpath = os.path.join(out, "metrics.jsonl")
                title = f"ringlinear rl: {cfg.task}, numerics {cfg.numerics}, old log-probs {cfg.old_logprobs}"
                summary["plots"] = [p for p in (plot_reward(mpath, os.path.join(out, "reward.png"), title),
                                                plot_mismatch(mpath, os.path.join(out, "mismatch.png"), title)) if p]
            except ImportError:
                log.warning("matplotlib is not installed: no plots (pip install 'ringlinear[train]')")
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if rewards:
            print(f"rl: {summary['steps_run']} steps ({tr.step}/{cfg.steps}) in {seconds:.0f}s; reward "
                  f"{summary['reward_first']:.3f} (first {k}) -> {summary['reward_last']:.3f} (last {k}); "
                  f"model -> {summary['model_dir']}", flush=True)
    return summary
