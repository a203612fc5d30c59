"""`TrainConfig`: every `ringlinear train` flag, and the training presets (the model shapes they train are model
presets: `ringlinear.models.presets`).

The CLI is generated from the dataclass: field `seq_len` is flag `--seq-len`, its help is the field's `help`
metadata, booleans get `--x/--no-x`. A preset fills every field; flags given on the command line override it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ..models.config import RingLinearConfig
from ..models.presets import PRESETS


def _f(default, help: str, **meta):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # --- what to train
    preset: str = _f("tiny-code", "training preset (fills every field; the flags given override it): listed below")
    data: list = _f([], "corpus: files, directories or globs of .txt/.md/.py, .jsonl (text field) and .parquet; "
                        "empty = the embedded default (this Python's standard-library sources)", nargs="*",
                    type=str)
    text_field: str = _f("text", "field holding the document text in .jsonl records and .parquet columns")
    data_format: str = _f("auto", "text (documents) or chat (.jsonl records with OpenAI-style 'messages': SFT with "
                                  "the loss on assistant tokens only); auto = chat when the first record has "
                                  "'messages'", choices=["auto", "text", "chat"])
    out: str = _f("runs/train", "output directory: checkpoints/, final/, metrics.jsonl, loss.png, data cache")
    data_cache: str = _f("", "directory of the tokenised-corpus cache (default OUT/data); runs on the same corpus, "
                             "split and tokenizer can share one")
    init_from: str = _f("", "continue from this checkpoint directory (its weights and tokenizer), e.g. the "
                            "output of `ringlinear convert`; empty = random init")
    model_preset: str = _f("tiny-code", "model shape for random init: a model preset (tiny-code, tiny-test, tiny, "
                                        "small, ring-mini-linear-2.0, ...)")
    model_config: str = _f("", "config.json for random init (overrides --model-preset)")
    tokenizer: str = _f("", "directory with tokenizer.json to use instead of training a BPE")
    vocab_size: int = _f(4096, "BPE vocabulary size when training a tokenizer (the model's vocab follows it)")
    bpe_sample_mb: float = _f(8.0, "MB of training text the BPE is learnt from")
    max_corpus_mb: float = _f(0.0, "use at most this many MB of (shuffled) documents; 0 = all")
    # --- batch and schedule
    seq_len: int = _f(256, "tokens per packed row")
    batch_size: int = _f(8, "rows per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    steps: int = _f(500, "optimizer steps (the LR schedule spans these)")
    stop_at: int = _f(0, "stop (with a checkpoint) after this step, keeping the schedule of --steps; resume "
                         "later with --resume; 0 = run to --steps")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final LR as a fraction of --lr")
    schedule: str = _f("cosine", "LR schedule after warmup", choices=["cosine", "wsd", "constant"])
    warmup_steps: int = _f(30, "linear warmup steps")
    decay_fraction: float = _f(0.2, "WSD: fraction of --steps spent decaying at the end")
    weight_decay: float = _f(0.1, "AdamW weight decay (never on norms, embeddings, biases)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(0, "seed for init, document shuffling, split and row order")
    # --- MoE balancing (Ling-2.0 recipe)
    bias_update_rate: float = _f(1e-3, "aux-loss-free balancing: expert_bias += rate * sign(mean load - load) "
                                       "after every step (0 = off)")
    seq_aux_loss_coef: float = _f(0.0, "weight of the sequence-level balance loss (e.g. 1e-4; 0 = off)")
    # --- evaluation and output
    val_fraction: float = _f(0.02, "fraction of documents held out for validation")
    eval_every: int = _f(100, "validation loss every N steps (also at the start and the end; 0 = only those)")
    eval_rows: int = _f(32, "rows of the held-out set scored per validation (0 = all)")
    save_every: int = _f(250, "checkpoint every N steps (and at the end; 0 = only at the end)")
    keep_last: int = _f(2, "keep the last N checkpoints")
    async_save: bool = _f(False, "write checkpoints in a background thread: the step pays only for a host copy of "
                                 "the model and optimizer state (held in RAM until written; on CUDA cloned on the "
                                 "device where it fits, then staged through pinned RAM kept for the run); same files, "
                                 "atomicity and exact resume")
    async_save_device_copy: str = _f("auto", "--async-save on CUDA: clone the state on the device first, so the "
                                             "optimizer step after a save waits only for that clone; auto = when "
                                             "the peak so far + the state + 4 GiB fit the GPU (decided at the "
                                             "first save), on, or off (straight to pinned memory: that step waits "
                                             "for the host copy)", choices=["auto", "on", "off"])
    resume: str = _f("", "'auto' = latest checkpoint in --out, or a checkpoint directory; continues exactly")
    overwrite: bool = _f(False, "start a new run in an --out that holds checkpoints of an earlier one (deletes them)")
    progress: bool = _f(True, "progress bar (tqdm) on a terminal; plain log lines otherwise")
    plot: bool = _f(True, "write loss.png (matplotlib) at the end")
    # --- performance
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    precision: str = _f("auto", "auto = bf16 on CUDA, fp32 on CPU; bf16 = bf16 parameters with fp32 master weights and "
                                "moments in the optimizer; fp8 = bf16 as that, with the dense projections and the dense "
                                "MLP in FP8 (e4m3, 1x128 / 128x128 scales: docs/fp8.md)",
                        choices=["auto", "fp32", "bf16", "fp8"])
    fp8_experts: bool = _f(False, "--precision fp8: the MoE experts in FP8 too (slower than bf16 on an H200 today: "
                                  "docs/fp8.md)")
    fp8_emulate: bool = _f(False, "--precision fp8 without FP8 hardware (CPU): the exact emulation, slow (tests)")
    numerics: str = _f("default", "default (fastest kernels) or aligned (the forward serving's aligned mode "
                                  "reproduces bit for bit: docs/numerics.md)", choices=["default", "aligned"])
    log_every: int = _f(1, "read the step statistics back from the device every N steps (one sync per N steps; "
                           "metrics.jsonl still gets every step)")
    grad_checkpointing: bool = _f(False, "activation checkpointing per decoder layer")
    compile: bool = _f(False, "torch.compile the model")
    fsdp: bool = _f(False, "FSDP2 (fully_shard per layer, every parameter sharded) instead of DDP: see "
                           "docs/training.md")
    ep: int = _f(1, "expert parallelism (with --fsdp): the routed experts of every MoE layer split over groups of N "
                    "consecutive processes, tokens sent to their experts by all-to-all; world = data-parallel x N")
    cp: int = _f(1, "context parallelism: every row of a micro-batch split over groups of N consecutive processes "
                    "(linear-attention states passed along the group, softmax K/V gathered); world = "
                    "data-parallel x N")
    threads: int = _f(0, "torch CPU threads per process (0 = torch default, one per core); on a shared or busy "
                         "CPU use 1: threads that wait for taken cores spin (measured 10x slower)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def validate(self) -> "TrainConfig":
        pos = {"seq_len": 2, "batch_size": 1, "grad_accum": 1, "steps": 1, "vocab_size": 64, "keep_last": 1,
               "log_every": 1}
        for k, lo in pos.items():
            if getattr(self, k) < lo:
                raise ValueError(f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(self, k)}")
        for k in ("eval_every", "save_every", "warmup_steps", "stop_at", "eval_rows", "threads"):
            if getattr(self, k) < 0:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ValueError("--min-lr-ratio must be in [0, 1] and --decay-fraction in (0, 1]")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.async_save_device_copy not in ("auto", "on", "off"):
            raise ValueError(f"--async-save-device-copy must be auto, on or off, got {self.async_save_device_copy!r}")
        if (self.fp8_experts or self.fp8_emulate) and self.precision != "fp8":
            raise ValueError("--fp8-experts and --fp8-emulate need --precision fp8")
        if self.precision == "fp8" and self.numerics == "aligned":
            raise ValueError("--numerics aligned runs the serving engine's bf16 arithmetic; it cannot be combined "
                             "with --precision fp8")
        if self.stop_at > self.steps:
            raise ValueError(f"--stop-at {self.stop_at} is past --steps {self.steps}")
        # Refused rather than warned: with warmup past the end the LR never reaches --lr and the schedule the
        # flags describe never runs, so the run is not the experiment asked for (a warning scrolls away).
        if self.warmup_steps > self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} is past --steps {self.steps}: the LR would never "
                             f"reach --lr; give --warmup-steps {self.steps} or fewer")
        # The model and the output directory are checked now, not after minutes of BPE training.
        if self.model_config:
            RingLinearConfig.from_json(self.model_config)
        elif not self.init_from and self.model_preset not in PRESETS:
            raise ValueError(f"unknown --model-preset {self.model_preset!r}; choose one of {', '.join(PRESETS)}")
        self._validate_parallel()
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out} is a file, not a directory")
        return self

    def _validate_parallel(self) -> None:
        """What --ep / --cp combine with (the world size is checked when the processes start)."""
        for k in ("ep", "cp"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k} must be >= 1, got {getattr(self, k)}")
        if self.ep > 1 and not self.fsdp:
            raise ValueError(f"--ep {self.ep} needs --fsdp (the experts are sharded DTensors beside FSDP2's shards)")
        if self.ep > 1 and self.cp > 1:
            raise ValueError("--ep and --cp together are not supported yet: use one of them")
        if (self.ep > 1 or self.cp > 1) and self.precision == "fp8":
            raise ValueError("--precision fp8 with --ep or --cp is not supported yet")
        if self.cp > 1:
            if self.seq_aux_loss_coef > 0:
                raise ValueError("--seq-aux-loss-coef needs whole rows on one process; it cannot be used with --cp")
            if self.numerics == "aligned":
                raise ValueError("--numerics aligned starts every sequence from a zero state; it cannot be used "
                                 "with --cp")
            if (self.batch_size * self.seq_len) % self.cp:
                raise ValueError(f"--cp {self.cp} must divide the tokens of a micro-batch (--batch-size x --seq-len "
                                 f"= {self.batch_size * self.seq_len})")


# Fields that define the run: changing them on --resume would not continue the same run.
RUN_DEFINING = ("data", "text_field", "data_format", "init_from", "model_preset", "model_config", "tokenizer", "vocab_size",
                "bpe_sample_mb", "max_corpus_mb", "seq_len", "seed", "val_fraction")


# ---------------------------------------------------------------------- presets
def _tiny_code() -> TrainConfig:
    # Sized so `make demo` (BPE, 500 steps, generation) finishes in about 5 minutes on a 2-core CPU.
    return TrainConfig()


def _tiny_test() -> TrainConfig:
    """Seconds-long runs for tests: the tiny model on a small corpus."""
    return TrainConfig(preset="tiny-test", model_preset="tiny-test", vocab_size=320, bpe_sample_mb=1.0,
                       seq_len=64, batch_size=4, steps=20, lr=3e-3, warmup_steps=2, eval_every=10, eval_rows=8,
                       save_every=10, keep_last=2, bias_update_rate=1e-2, plot=False)


def _small_code() -> TrainConfig:
    """The `small` model preset (~17M params) on the whole default corpus: an hour-scale CPU run."""
    return TrainConfig(preset="small-code", model_preset="small", seq_len=512, batch_size=8, grad_accum=2,
                       steps=3000, lr=2e-3, warmup_steps=100, eval_every=250, save_every=500, bpe_sample_mb=16.0)


def _continue() -> TrainConfig:
    """Continued pre-training of a converted checkpoint (paper §4): WSD, modest LR, longer warmup."""
    return TrainConfig(preset="continue", schedule="wsd", lr=3e-4, warmup_steps=200, steps=2000, decay_fraction=0.2,
                       seq_len=4096, batch_size=1, grad_accum=8, eval_every=250, save_every=500, keep_last=3,
                       grad_checkpointing=True)


TRAIN_PRESETS = {
    "tiny-code": (_tiny_code, "default: a ~6M-param 2:1 hybrid MoE on the stdlib sources, minutes on a laptop CPU"),
    "tiny-test": (_tiny_test, "the tiny test model, seconds (tests, smoke runs)"),
    "small-code": (_small_code, "the ~17M-param `small` model, longer run on the whole default corpus"),
    "continue": (_continue, "continued pre-training after `ringlinear convert` (use with --init-from and --data)"),
}


def get_train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name][0]().replace(preset=name)


def describe_presets() -> str:
    return "\n".join(f"  {k:12s} {doc}" for k, (_, doc) in TRAIN_PRESETS.items())


def dump(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
