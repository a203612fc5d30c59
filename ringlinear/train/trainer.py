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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models.config import RingLinearConfig
from ..models.modeling import RingLinearForCausalLM
from ..models.presets import get_preset
from ..models.tokenizer import load_tokenizer
from ..parallel.context import ContextParallel
from ..parallel.expert import ExpertParallel, check_expert_parallel
from . import dist as D
from . import fsdp
from . import step as S
from .async_save import AsyncSaver
from .balance import MoEBalancer
from .checkpoint import (find_resume, list_checkpoints, load_trainer_state, remove_stale_temp, rng_state,
                         save_checkpoint, set_rng_state, step_name, verify_checkpoint)
from .config import RUN_DEFINING, TrainConfig
from .loop import run
from .optim import make_optimizer, make_scheduler
from .packing import RowSchedule, collate, pad_rows
from .prepare import prepare, training_rows

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
        device_copy = {"auto": None, "on": True, "off": False}[cfg.async_save_device_copy]
        self.saver = AsyncSaver(env.device, device_copy=device_copy) if cfg.async_save and env.is_main else None
        self._save_buffers_ready = False
        if cfg.precision == "fp8" and env.device.type != "cuda" and not cfg.fp8_emulate:
            raise ValueError(f"--precision fp8 needs a CUDA GPU with FP8 tensor cores (sm_89+); on {env.device.type} "
                             "add --fp8-emulate for the exact (slow) emulation")
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
        # --ep / --cp against the world and the model, before any data work
        if env.world % cfg.cp:
            raise ValueError(f"--cp {cfg.cp} does not divide the {env.world} processes (world = data-parallel x cp)")
        check_expert_parallel(cfg.ep, env.world, _architecture(cfg, self.resume_path).num_experts)
        tok_src = self.resume_path or cfg.init_from or cfg.tokenizer or None
        _on_main(env, lambda: _claim_out_dir(cfg))
        self.prep = _on_main(env, lambda: prepare(cfg, tok_src))
        self.rows, self.val_rows = training_rows(self.prep, cfg.seq_len)
        if len(self.rows) == 0:
            raise ValueError(f"the training split has fewer tokens than one row of --seq-len {cfg.seq_len}; add data "
                             "or lower --seq-len")
        # context parallelism: the processes of a CP group read the same rows (and take a piece of each)
        self.sched_rows = RowSchedule(len(self.rows), cfg.seed, cfg.batch_size, cfg.grad_accum, env.world // cfg.cp,
                                      env.rank // cfg.cp)
        self.model = self._build_model()
        dev = env.device
        # bf16 = the parameters themselves in bf16 (every kernel on bf16 operands, no per-step casts) with fp32
        # master weights and moments in the optimizer (MasterAdamW); auto = bf16 on CUDA, fp32 on CPU.
        self.param_dtype = torch.bfloat16 if cfg.precision in ("bf16", "fp8") or (
            cfg.precision == "auto" and dev.type == "cuda") else torch.float32
        self.model.to(device=dev, dtype=self.param_dtype).train()
        self.model.set_numerics(cfg.numerics)
        self.model.model.gradient_checkpointing = cfg.grad_checkpointing
        self.balancer = MoEBalancer(self.model, cfg.bias_update_rate, cfg.seq_aux_loss_coef)
        self.fwd = self._wrap()  # before the optimizer: FSDP2 replaces the Parameters it shards
        # expert parallelism: parameters on two meshes, which torch's fused and foreach updates cannot mix
        self.opt = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps,
                                  dev.type, per_tensor=self.ep is not None)
        self.lr_sched = make_scheduler(self.opt, cfg)
        self.fp8 = cfg.precision == "fp8"
        if self.fp8:
            from ..models.fp8 import convert_to_fp8
            from ..ops.fp8 import Fp8Recipe
            recipe = Fp8Recipe(emulate=cfg.fp8_emulate, experts=cfg.fp8_experts)
            convert_to_fp8(self.model, recipe, optimizer=self.opt)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.val_start = None
        if state is not None:
            self._load_state(state)
        self.autocast = contextlib.nullcontext  # parameters carry the precision; kept as the step's hook point

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
            # drawn on the training device: seconds for billions of parameters (a CUDA generator: a GPU run and a
            # CPU run of the same seed start from different weights; --init-from a checkpoint gives both the same)
            model = RingLinearForCausalLM.from_config(mc, dtype=torch.float32, device=self.env.device, seed=cfg.seed)
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
        self.ep = self.cp = None
        if cfg.ep > 1:  # before FSDP2, which leaves the expert DTensors to it
            self.ep = ExpertParallel(cfg.ep, env.world, env.device.type)
            self.ep.apply(m)
        if cfg.cp > 1:
            self.cp = ContextParallel(cfg.cp, env.world, env.device.type)
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
        """Forward and backward of all micro-batches of `step` (gradients left in .grad). Returns the step's
        statistics, device tensors (see ringlinear.train.step)."""
        return S.forward_backward(self, self._batches(step))

    def optimizer_step(self) -> dict:
        if self.saver is not None:  # the step writes what a staged snapshot may still be copying
            self.saver.before_update()
        out = S.optimizer_step(self)
        if self.saver is not None and not self._save_buffers_ready:
            # The snapshot's layout exists once the optimizer state does: its pinned host buffers are allocated
            # and page-locked here, once (seconds for tens of GB), not inside the first checkpoint step. RNG
            # states stand in for every rank's without a collective (only this rank saves): same shapes.
            self._save_buffers_ready = True
            if not self.fsdp:  # FSDP's snapshot is a gathered full state dict (a collective): its first save pins
                rngs = [rng_state()] * self.env.world
                self.saver.prepare(self.model, self._checkpoint_state({"optimizer": self.opt.state_dict()}, rngs))
        return out

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the first --eval-rows held-out rows (split over processes)."""
        env, cfg = self.env, self.cfg
        n = len(self.val_rows) if cfg.eval_rows == 0 else min(cfg.eval_rows, len(self.val_rows))
        if n == 0:
            return None
        self.model.eval()
        # FSDP forwards are collective: every rank scores every row (in lockstep) instead of a share of them;
        # under context parallelism the ranks of a CP group score the same rows, a piece each
        groups, group = (env.world // cfg.cp, env.rank // cfg.cp)
        mine = list(range(n)) if self.fsdp else list(range(group, n, groups))
        tot = torch.zeros(2, dtype=torch.float64, device=env.device)
        for i in range(0, len(mine), cfg.batch_size):
            rows = [self.val_rows.row(j) for j in mine[i:i + cfg.batch_size]]
            if self.cp is not None:
                rows = pad_rows(rows, self.cp.cp)
            b = collate(rows, env.device)
            with self.autocast():
                ce = S.token_loss(self, self.model, b)
            # each CP group's targets counted once (by its first rank), each token's loss on the rank holding it
            n_t = float(b["n_targets"]) if self.cp is None or self.cp.rank == 0 else 0.0
            tot += torch.stack([ce.double(), ce.new_tensor(n_t, dtype=torch.float64)])
        self.model.train()
        if not self.fsdp:
            D.all_reduce_sum(env, tot)
        elif self.cp is not None:
            dist.all_reduce(tot, group=self.cp.group)
        return float(tot[0] / tot[1].clamp_min(1))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self, opt_state: dict, rngs: list) -> dict:
        """Everything of a checkpoint but the model: step, data position, optimizer, scheduler, RNG, config."""
        return {"step": self.step, "rows_consumed": self.step * self.sched_rows.global_rows,
                "global_rows": self.sched_rows.global_rows, "world_size": self.env.world, **opt_state,
                "scheduler": self.lr_sched.state_dict(), "rng": rngs, "config": self.cfg.to_dict(),
                "tokens": self.tokens_seen, "elapsed_s": self.elapsed, "val_start": self.val_start}

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
            state = self._checkpoint_state(opt_state, rngs)
            root = os.path.join(cfg.out, "checkpoints")
            if self.saver is None:
                path = save_checkpoint(root, self.step, model, self.prep.tokenizer_dir, state, cfg.keep_last)
            else:  # the snapshot now (the weights move on), the files in the background
                model_snap, state_snap = self.saver.snapshot(model, state)
                path = os.path.join(root, step_name(self.step))
                self.saver.submit(path, save_checkpoint, root, self.step, model_snap, self.prep.tokenizer_dir,
                                  state_snap, cfg.keep_last)
        D.barrier(env)
        return path

    def wait_for_save(self) -> None:
        """The asynchronous save in flight, written (its error re-raised here); a no-op otherwise."""
        if self.saver is not None:
            self.saver.wait()

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


def _architecture(cfg: TrainConfig, src: str | None) -> RingLinearConfig:
    """The model's shape as the run will build it (vocabulary aside), read without building it."""
    src = src or cfg.init_from
    if src:
        return RingLinearConfig.from_json(os.path.join(src, "config.json"))
    return RingLinearConfig.from_json(cfg.model_config) if cfg.model_config else get_preset(cfg.model_preset)


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

