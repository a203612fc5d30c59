"""The training loop: one process or many (torchrun; DDP over nccl/gloo), exact resume.

Loss normalisation: every step divides the summed token losses by the number of target tokens of the whole step
(all micro-batches, all processes), counted before the first forward. DDP averages gradients over processes, so
each process scales by world/global_tokens; the result equals one process on the combined batch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models.config import RingLinearConfig
from ..models.modeling import RingLinearForCausalLM
from ..models.presets import get_preset
from ..models.tokenizer import load_tokenizer
from . import dist as D
from . import fsdp
from .balance import MoEBalancer
from .checkpoint import (find_resume, list_checkpoints, load_trainer_state, remove_stale_temp, rng_state,
                         save_checkpoint, set_rng_state, verify_checkpoint)
from .config import RUN_DEFINING, TrainConfig
from .loop import run
from .optim import make_optimizer, make_scheduler
from .packing import PackedRows, RowSchedule, collate
from .prepare import load_streams, prepare

log = logging.getLogger("ringlinear.train")


def _on_main(env, fn):
    """Run fn on rank 0 only; its result (or its error, re-raised everywhere) reaches every rank."""
    res, err = None, None
    if env.is_main:
        try:
            res = fn()
        except Exception as e:  # carried to the other ranks so all of them stop with the same message
            err = e
    res, err_msg = D.broadcast_object(env, (res, None if err is None else (type(err).__name__, str(err))))
    if err is not None:
        raise err
    if err_msg is not None:
        raise ValueError(f"rank 0 failed: {err_msg[0]}: {err_msg[1]}")
    return res


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.env = env = D.setup(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif env.device.type == "cpu" and env.is_main:
            _warn_if_cpu_busy()
        torch.manual_seed(cfg.seed)
        self.resume_path, state = None, None
        if cfg.resume:
            self.resume_path = _on_main(env, lambda: _checked_resume(cfg))
            state = load_trainer_state(self.resume_path)
            _check_same_run(state["config"], cfg)
        tok_src = self.resume_path or cfg.init_from or cfg.tokenizer or None
        _on_main(env, lambda: _claim_out_dir(cfg))
        self.prep = _on_main(env, lambda: prepare(cfg, tok_src))
        train_stream, val_stream = load_streams(self.prep)
        self.rows = PackedRows(train_stream, cfg.seq_len)
        self.val_rows = PackedRows(val_stream, cfg.seq_len, partial=True)
        if len(self.rows) == 0:
            raise ValueError(f"the training split has {train_stream.tokens.size} tokens: fewer than one row of "
                             f"--seq-len {cfg.seq_len}; add data or lower --seq-len")
        self.sched_rows = RowSchedule(len(self.rows), cfg.seed, cfg.batch_size, cfg.grad_accum, env.world, env.rank)
        self.model = self._build_model()
        dev = env.device
        self.model.to(dev).train()
        self.model.model.gradient_checkpointing = cfg.grad_checkpointing
        self.balancer = MoEBalancer(self.model, cfg.bias_update_rate, cfg.seq_aux_loss_coef)
        self.fwd = self._wrap()  # before the optimizer: FSDP2 replaces the Parameters it shards
        self.opt = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps,
                                  dev.type)
        self.lr_sched = make_scheduler(self.opt, cfg)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.val_start = None
        if state is not None:
            self._load_state(state)
        amp = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
        self.autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    # ------------------------------------------------------------------ setup
    def _build_model(self):
        cfg = self.cfg
        tok = load_tokenizer(self.prep.tokenizer_dir)
        src = self.resume_path or cfg.init_from
        if src:
            model = RingLinearForCausalLM.from_pretrained(src, dtype=torch.float32)
        else:
            mc = _model_config(cfg, tok.vocab_size).replace(
                eos_token_id=tok.stop_token_ids or None, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
            model = RingLinearForCausalLM.from_config(mc, dtype=torch.float32, seed=cfg.seed)
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
        return model

    def _load_state(self, st: dict) -> None:
        saved_global = st["global_rows"]
        if saved_global != self.sched_rows.global_rows:
            raise ValueError(f"cannot resume: the checkpoint used {saved_global} rows per step (world x grad-accum x "
                             f"batch-size), this run {self.sched_rows.global_rows}; keep the product equal")
        if self.fsdp:
            fsdp.load_optimizer(self.model, self.opt, st)
        elif "optimizer" not in st:
            raise ValueError("this checkpoint was written by an --fsdp run: resume it with --fsdp")
        else:
            self.opt.load_state_dict(st["optimizer"])
        # The schedule's lambdas are plain functions, never pickled: they follow this run's --steps.
        self.lr_sched.load_state_dict(st["scheduler"])
        self.step, self.tokens_seen, self.elapsed = st["step"], st["tokens"], st["elapsed_s"]
        self.val_start = st.get("val_start")
        rngs = st["rng"]
        set_rng_state(rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0])

    def _wrap(self):
        cfg, env = self.cfg, self.env
        m = self.model
        self.fsdp = cfg.fsdp
        if cfg.fsdp:
            m = fsdp.apply_fsdp(m, env)
        elif env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            # expert_bias is kept identical on every rank by the balancer: no per-forward buffer broadcast.
            m = DDP(m, device_ids=ids, broadcast_buffers=False)
        self.ddp = m if m is not self.model else None
        return torch.compile(m) if cfg.compile else m

    # ------------------------------------------------------------------ steps
    def _batches(self, step: int):
        dev = self.env.device
        return [collate([self.rows.row(i) for i in mb], dev) for mb in self.sched_rows.micro_batches(step)]

    def forward_backward(self, step: int) -> dict:
        """Forward and backward of all micro-batches of `step` (gradients left in .grad). Returns step stats."""
        env = self.env
        batches = self._batches(step)
        n_tok = torch.tensor([sum(int((b["labels"] != -100).sum()) for b in batches)], dtype=torch.float64)
        global_tok = float(D.all_reduce_sum(env, n_tok.to(env.device)).item())
        scale = env.world / max(global_tok, 1.0)
        aux_scale = env.world / self.sched_rows.global_rows
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        no_sync = getattr(self.ddp, "no_sync", None)  # DDP only; FSDP2 reduces every micro-batch
        for m, b in enumerate(batches):
            last = m == len(batches) - 1
            with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
                with self.autocast():
                    logits = self.fwd(b["input_ids"], cu_seqlens=b["cu_seqlens"]).logits  # [1, T, V] fp32
                ce = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), b["labels"].view(-1),
                                     ignore_index=-100, reduction="sum")
                loss = ce * scale
                aux = self.balancer.after_forward(b["row_ids"], b["n_rows"])
                if aux is not None:
                    loss = loss + aux * aux_scale
                    aux_sum += aux.detach().double()
                loss.backward()
            loss_sum += ce.detach().double()
        sums = D.all_reduce_sum(env, torch.stack([loss_sum, aux_sum]))
        return {"loss": float(sums[0]) / max(global_tok, 1.0), "aux_loss": float(sums[1]) / self.sched_rows.global_rows,
                "target_tokens": global_tok, "tokens": self.sched_rows.global_rows * self.cfg.seq_len}

    def optimizer_step(self) -> dict:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.fsdp:
            self.model._expert_sync()
            gn = fsdp.clip_grads(params, cfg.grad_clip)
        elif cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gn = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.lr_sched.step()
        self.opt.zero_grad(set_to_none=True)
        moe = self.balancer.step(lambda t: D.all_reduce_sum(self.env, t))
        return {"grad_norm": float(gn), "lr": lr, **moe}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the first --eval-rows held-out rows (split over processes)."""
        env, cfg = self.env, self.cfg
        n = len(self.val_rows) if cfg.eval_rows == 0 else min(cfg.eval_rows, len(self.val_rows))
        if n == 0:
            return None
        self.model.eval()
        # FSDP forwards are collective: every rank scores every row (in lockstep) instead of a share of them
        mine = list(range(n)) if self.fsdp else list(range(env.rank, n, env.world))
        tot = torch.zeros(2, dtype=torch.float64, device=env.device)
        for i in range(0, len(mine), cfg.batch_size):
            b = collate([self.val_rows.row(j) for j in mine[i:i + cfg.batch_size]], env.device)
            with self.autocast():
                logits = self.model(b["input_ids"], cu_seqlens=b["cu_seqlens"]).logits
            ce = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), b["labels"].view(-1), ignore_index=-100,
                                 reduction="sum")
            tot += torch.stack([ce.double(), (b["labels"] != -100).sum().double()])
        self.model.train()
        if not self.fsdp:
            D.all_reduce_sum(env, tot)
        return float(tot[0] / tot[1].clamp_min(1))

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str | None:
        env, cfg = self.env, self.cfg
        rngs = D.gather_objects(env, rng_state())
        if self.fsdp:
            model = fsdp.gathered_model(self.model, env)
            opt_state = {"optimizer_full": fsdp.full_optimizer_state(self.model, self.opt)}
        else:
            model, opt_state = self.model, {"optimizer": self.opt.state_dict()}
        path = None
        if env.is_main:
            state = {"step": self.step, "rows_consumed": self.step * self.sched_rows.global_rows,
                     "global_rows": self.sched_rows.global_rows, "world_size": env.world, **opt_state,
                     "scheduler": self.lr_sched.state_dict(), "rng": rngs, "config": cfg.to_dict(),
                     "tokens": self.tokens_seen, "elapsed_s": self.elapsed, "val_start": self.val_start}
            path = save_checkpoint(os.path.join(cfg.out, "checkpoints"), self.step, model,
                                   self.prep.tokenizer_dir, state, cfg.keep_last)
        D.barrier(env)
        return path

    def export_model(self, path: str) -> None:
        """The model alone, in the published layout (collective under FSDP: call on every rank)."""
        model = self.model
        if self.fsdp:
            model = fsdp.gathered_model(self.model, self.env)
        if self.env.is_main:
            model.save_pretrained(path, tokenizer_dir=self.prep.tokenizer_dir)
        D.barrier(self.env)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        try:
            return run(self)
        finally:
            D.teardown(self.env)


def _model_config(cfg: TrainConfig, vocab_size: int) -> RingLinearConfig:
    """The architecture to initialise randomly, with the vocabulary sized to the tokenizer (multiple of 64)."""
    mc = RingLinearConfig.from_json(cfg.model_config) if cfg.model_config else get_preset(cfg.model_preset)
    padded = -(-vocab_size // 64) * 64
    return mc.replace(vocab_size=max(padded, 64), torch_dtype="float32")


def _warn_if_cpu_busy() -> None:
    """torch runs one thread per core; on a CPU other processes keep busy, those threads spin-wait for each other.
    Measured on a 2-core box at load 7: tiny-test at ~200 tok/s with the default 2 threads, 2,500 with --threads 1.
    The default is not changed behind the user's back (the thread count changes the float results, and so a run's
    bitwise reproducibility): this says it instead."""
    n = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if n > 1 and load >= (os.cpu_count() or n):
        log.warning("the CPU is busy (load %.1f on %d cores): torch's %d threads will wait on each other; "
                    "--threads 1 can be several times faster here", load, os.cpu_count(), n)


def _claim_out_dir(cfg) -> None:
    """A new run never mixes with an earlier run's checkpoints (rotation would delete the wrong ones)."""
    root = os.path.join(cfg.out, "checkpoints")
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, ...
        raise ValueError(f"--out {cfg.out}: cannot create the directory ({e.strerror})") from None
    remove_stale_temp(root)
    if cfg.resume or not list_checkpoints(root):
        return
    if not cfg.overwrite:
        raise ValueError(f"{cfg.out} holds checkpoints of an earlier run: continue it with --resume auto, start over "
                         "with --overwrite, or pick another --out")
    log.info("--overwrite: removing the earlier run's checkpoints and final model in %s", cfg.out)
    shutil.rmtree(root)
    shutil.rmtree(os.path.join(cfg.out, "final"), ignore_errors=True)


def _checked_resume(cfg) -> str:
    path = find_resume(cfg.out, cfg.resume)
    verify_checkpoint(path)
    return path


def _check_same_run(saved: dict, cfg: TrainConfig) -> None:
    diff = [k for k in RUN_DEFINING if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        parts = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise ValueError(f"--resume continues the saved run, but these settings differ from it: {parts}. "
                         "Start a new run (another --out) to change them.")

