"""The step loop around a set-up `Trainer`: metrics, validation, checkpoints, the final model, plot and summary."""
from __future__ import annotations

import json
import logging
import math
import os
import time

from .config import dump
from .report import MetricsLog, Progress, plot_losses, summary_line
from .step import to_host

log = logging.getLogger("ringlinear.train")


def describe_model(mc) -> str:
    s = f"{mc.num_hidden_layers} layers: {len(mc.linear_layers)} linear + {len(mc.softmax_layers)} softmax"
    if mc.num_experts:
        s += f", {mc.num_experts} experts top-{mc.num_experts_per_tok}" + (" + shared" if mc.num_shared_experts else "")
    return s


def run(tr) -> dict:
    cfg, env = tr.cfg, tr.env
    main = env.is_main
    out = cfg.out
    resumed_from = tr.step if tr.resume_path else None
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), resumed_from) if main else None
    end = cfg.stop_at or cfg.steps
    mc = tr.model.config
    n_params = sum(p.numel() for p in tr.model.parameters())
    if main:
        with open(os.path.join(out, "train_config.json"), "w") as f:
            f.write(dump(cfg) + "\n")
        info = tr.prep.info
        corpus = "the embedded stdlib corpus" if info["default_corpus"] else f"{info['files']} file(s)"
        log.info("model: %.2fM params, %s; vocab %d", n_params / 1e6, describe_model(mc), mc.vocab_size)
        if info.get("format") == "chat":
            log.info("data: %s -> %d train / %d held-out conversations in %d rows of %d (assistant tokens only)",
                     corpus, *info["docs"], len(tr.rows), cfg.seq_len)
        else:
            log.info("data: %s -> %.2fM train tokens (%d rows of %d), %.0fk held-out tokens", corpus,
                     tr.rows.stream.tokens.size / 1e6, len(tr.rows), cfg.seq_len,
                     tr.val_rows.stream.tokens.size / 1e3)
        log.info("batch: %d rows x %d tokens = %d tokens/step (%d proc x %d accum x %d rows); device %s%s",
                 tr.sched_rows.global_rows, cfg.seq_len, tr.sched_rows.global_rows * cfg.seq_len, env.world,
                 cfg.grad_accum, cfg.batch_size, env.device, ", resuming at step %d" % tr.step if resumed_from else "")
    if resumed_from is None:
        tr.val_start = tr.evaluate()
        if main and tr.val_start is not None:
            metrics.write({"step": 0, "val_loss": tr.val_start})
            log.info("step 0: val loss %.4f", tr.val_start)
    progress = Progress(cfg.steps, tr.step, main and cfg.progress)
    first, tokens0, t_run = tr.step, tr.tokens_seen, time.perf_counter()
    last_loss, last_val, saved_at = float("nan"), None, None
    pending, t_flush = [], time.perf_counter()  # steps whose device statistics are not read yet

    def flush():
        """Read the pending steps' statistics (one sync), check the loss, write their records."""
        nonlocal last_loss, t_flush
        if not pending:
            return
        now = time.perf_counter()
        dt = (now - t_flush) / len(pending)  # the GPU runs ahead of the host: time per step over the interval
        t_flush = now
        fp8_bad = 0
        if tr.fp8:
            from ..ops.fp8 import read_nonfinite
            fp8_bad = read_nonfinite(tr.env.device)  # NaN/inf that reached an FP8 quantiser since the last read
        for step, st in pending:
            st = to_host(st)
            last_loss = st["loss_sum"] / max(st["targets"], 1.0)
            if not math.isfinite(last_loss):
                why = f"; {fp8_bad} non-finite values reached FP8 quantisers" if fp8_bad else ""
                raise FloatingPointError(f"loss is {last_loss} at step {step}{why}: lower --lr or raise "
                                         "--warmup-steps (the checkpoints written so far are intact)")
            if main:
                rec = {"step": step, "loss": last_loss, "lr": st["lr"], "grad_norm": st["grad_norm"],
                       "tokens": st["tokens_seen"], "tok_s": st["tokens"] / dt, "elapsed_s": round(st["elapsed"], 3)}
                rec.update({k: v for k, v in st.items() if k.startswith("moe_")})
                if tr.fp8:
                    rec["fp8_nonfinite"] = fp8_bad
                if cfg.seq_aux_loss_coef > 0:
                    rec["aux_loss"] = st["aux_sum"] / st["rows"]
                metrics.write(rec)
                progress.update(step, last_loss, st["tokens"] / dt, st["lr"])
        pending.clear()

    try:
        while tr.step < end:
            t0 = time.perf_counter()
            st = tr.forward_backward(tr.step)
            st.update(tr.optimizer_step())
            tr.step += 1
            tr.tokens_seen += st["tokens"]
            tr.elapsed += time.perf_counter() - t0
            pending.append((tr.step, {**st, "tokens_seen": tr.tokens_seen, "elapsed": tr.elapsed}))
            boundary = (cfg.eval_every and tr.step % cfg.eval_every == 0) or \
                (cfg.save_every and tr.step % cfg.save_every == 0)
            if tr.step % cfg.log_every == 0 or tr.step == end or boundary:
                flush()
            if cfg.eval_every and tr.step % cfg.eval_every == 0 and tr.step < end:
                last_val = _validate(tr, metrics, progress)
            if cfg.save_every and tr.step % cfg.save_every == 0 and tr.step < end:
                tr.save()
                saved_at = tr.step
        flush()
    except BaseException:
        try:  # the checkpoint being written when training failed is completed before the error goes up
            tr.wait_for_save()
        except Exception as e:
            log.error("%s", e)
        raise
    finally:
        progress.close()
    if tr.step > first:
        last_val = _validate(tr, metrics, progress)
    if saved_at != tr.step and tr.step > first:
        tr.save()
    tr.wait_for_save()
    final_dir = os.path.join(out, "final")
    if tr.step == cfg.steps:
        tr.export_model(final_dir)
    seconds = time.perf_counter() - t_run
    summary = {"params": n_params, "layout": describe_model(mc), "step": tr.step, "total_steps": cfg.steps,
               "steps_run": tr.step - first, "tokens": tr.tokens_seen - tokens0, "seconds": seconds,
               "tokens_per_s": (tr.tokens_seen - tokens0) / max(seconds, 1e-9), "world_size": env.world,
               "loss_end": last_loss, "val_loss_start": tr.val_start, "val_loss_end": last_val,
               "model_dir": final_dir if tr.step == cfg.steps else os.path.join(out, "checkpoints")}
    if main:
        metrics.close()
        if cfg.plot:
            try:
                png = plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"),
                                  f"ringlinear train: {summary['layout']}")
                summary["plot"] = png
            except ImportError:
                log.warning("matplotlib is not installed: no loss.png (pip install 'ringlinear[train]')")
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(summary_line(summary), flush=True)
        if tr.step < cfg.steps:
            print(f"stopped at step {tr.step} of {cfg.steps}; continue with: ringlinear train --out {out} "
                  "--resume auto", flush=True)
    return summary


def _validate(tr, metrics, progress):
    v = tr.evaluate()
    if v is not None and tr.env.is_main:
        metrics.write({"step": tr.step, "val_loss": v, "val_ppl": math.exp(min(v, 50))})
        progress.note(f"step {tr.step}: val loss {v:.4f}")
    return v
