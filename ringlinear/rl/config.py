"""`RLConfig`: every `ringlinear rl` flag (field `group_size` is flag `--group-size`), checked before any model loads."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ..train.config import _f
from ..models.context import NUMERICS


@dataclass
class RLConfig:
    # --- what to train, on what
    model: str = _f("", "policy checkpoint directory (config.json, safetensors, tokenizer files); also the "
                        "frozen reference policy of --kl-coef")
    task: str = _f("", "arithmetic | code | jsonl (a prompts file: --data and --reward)",
                   choices=["arithmetic", "code", "jsonl"])
    out: str = _f("runs/rl", "output directory: checkpoints/, final/, metrics.jsonl, reward.png, mismatch.png")
    steps: int = _f(100, "RL steps (each: one rollout batch, then --mini-batches optimizer updates)")
    numerics: str = _f("default", "default (fast kernels) or aligned (rollout log-probs equal to the training "
                                  "forward's; see docs/rl.md)", choices=list(NUMERICS))
    seed: int = _f(0, "seed of prompts, sampling and initialisation of the run")
    data: str = _f("", "--task jsonl: the prompts file (one JSON object per line with \"prompt\" or \"messages\")")
    reward: str = _f("", "--task jsonl: the reward function, module:function or file.py:function, called as "
                         "f(prompt, completion, record) -> float")
    difficulty: int = _f(1, "--task arithmetic: 1 (a+b, one digit) .. 4 (three operands, parentheses)")
    format_reward: float = _f(0.0, "--task arithmetic: extra reward for answering with the bare number")
    chat: bool = _f(False, "wrap text prompts in the checkpoint's chat template (jsonl \"messages\" always are)")
    # --- sampling
    temperature: float = _f(1.0, "sampling temperature (> 0); log-probs are those of the tempered distribution")
    top_p: float = _f(1.0, "nucleus sampling; < 1 samples off the policy the objective assumes (docs/rl.md)")
    max_new_tokens: int = _f(64, "completion length limit")
    ignore_eos: bool = _f(False, "sample every completion to --max-new-tokens (length-forced benchmarks)")
    # --- batch
    prompts_per_step: int = _f(8, "prompts per step (split over processes under torchrun)")
    group_size: int = _f(8, "GRPO group: samples per prompt, their advantages normalised within the group")
    mini_batches: int = _f(1, "optimizer updates per rollout batch (each on a 1/N share of the samples)")
    micro_batch_tokens: int = _f(8192, "packed tokens per forward/backward (gradient accumulation beyond that)")
    # --- objective
    advantage: str = _f("grpo", "grpo: (r - group mean) / group std; mean: r - group mean (no std scaling)",
                        choices=["grpo", "mean"])
    clip_eps: float = _f(0.2, "PPO clip range: the ratio is clipped to [1 - eps, 1 + eps]")
    old_logprobs: str = _f("rollout", "old policy of the ratio: rollout = the engine's own log-probs (paper Eq. 5); "
                                      "recompute = a training forward before the update (Eq. 6)",
                           choices=["rollout", "recompute"])
    loss_agg: str = _f("token", "token: mean over all tokens of the batch; sequence: mean per sample, then over "
                                "samples", choices=["token", "sequence"])
    tis_cap: float = _f(0.0, "truncated importance sampling: weight each token by min(p_train_old / p_rollout, "
                             "CAP); needs --old-logprobs recompute; 0 = off")
    mask_band: str = _f("", "drop tokens whose p_train_old / p_rollout is outside a band: 'B' = [1/B, B] or "
                            "'LO,HI'; empty = off")
    kl_coef: float = _f(0.0, "weight of the k3 KL penalty to the frozen initial policy (0 = off, no reference "
                             "model kept)")
    # --- optimizer
    lr: float = _f(1e-5, "AdamW learning rate (constant after warmup)")
    warmup_steps: int = _f(0, "linear LR warmup over this many optimizer updates")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0 = off)")
    # --- run
    save_every: int = _f(50, "checkpoint every N steps (and at the end; 0 = only at the end)")
    keep_last: int = _f(2, "keep the last N checkpoints")
    resume: str = _f("", "'auto' = latest checkpoint in --out, or a checkpoint directory; continues exactly")
    overwrite: bool = _f(False, "start a new run in an --out holding an earlier run's checkpoints (deletes them)")
    progress: bool = _f(True, "progress bar (tqdm) on a terminal; plain log lines otherwise")
    plot: bool = _f(True, "write reward.png and mismatch.png (matplotlib) at the end")
    # --- performance
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    dtype: str = _f("auto", "weights of policy and engine alike: auto = float32 on CPU, the checkpoint's on CUDA",
                    choices=["auto", "float32", "bfloat16"])
    max_num_seqs: int = _f(64, "engine: requests decoded at once")
    keep_engine_cache: bool = _f(False, "keep the engine's KV cache, state slots and CUDA graphs allocated during "
                                        "training (faster on GPU when memory allows; default frees them)")
    grad_checkpointing: bool = _f(False, "activation checkpointing per decoder layer in the training forward")
    sandbox_workers: int = _f(2, "--task code: sandboxed test runs at once")
    threads: int = _f(0, "torch CPU threads (0 = torch default)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RLConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown rl option(s) {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> "RLConfig":
        return dataclasses.replace(self, **kw)

    @property
    def band(self) -> tuple[float, float] | None:
        return parse_band(self.mask_band)

    def validate(self) -> "RLConfig":
        if not self.model:
            raise ValueError("--model is required (a checkpoint directory)")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"--model {self.model}: no config.json there (not a checkpoint directory)")
        if self.task not in ("arithmetic", "code", "jsonl"):
            raise ValueError(f"--task must be one of arithmetic, code, jsonl, got {self.task!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"--numerics must be one of {NUMERICS}, got {self.numerics!r}")
        pos = {"steps": 1, "max_new_tokens": 1, "prompts_per_step": 1, "group_size": 1, "mini_batches": 1,
               "micro_batch_tokens": 16, "keep_last": 1, "max_num_seqs": 1, "sandbox_workers": 1}
        for k, lo in pos.items():
            if getattr(self, k) < lo:
                raise ValueError(f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(self, k)}")
        for k in ("save_every", "warmup_steps", "threads", "tis_cap", "kl_coef", "weight_decay", "grad_clip",
                  "format_reward"):
            if getattr(self, k) < 0:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(self, k)}")
        if self.mini_batches > self.prompts_per_step * self.group_size:
            raise ValueError(f"--mini-batches {self.mini_batches} exceeds the {self.prompts_per_step * self.group_size}"
                             " samples of a step")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 (RL samples), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"--clip-eps must be in (0, 1), got {self.clip_eps}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.tis_cap > 0 and self.old_logprobs != "recompute":
            raise ValueError("--tis-cap needs --old-logprobs recompute (with rollout log-probs as the old policy the "
                             "ratio already corrects for the rollout engine; docs/rl.md)")
        self.band  # parses --mask-band or raises
        if self.difficulty not in (1, 2, 3, 4):
            raise ValueError(f"--difficulty must be 1..4, got {self.difficulty}")
        if self.task == "jsonl":
            if not self.data or not self.reward:
                raise ValueError("--task jsonl needs --data PROMPTS.jsonl and --reward module:function")
            from .tasks.custom import load_reward, read_prompts
            read_prompts(self.data)
            load_reward(self.reward)
        elif self.data or self.reward:
            raise ValueError(f"--data and --reward belong to --task jsonl, not --task {self.task}")
        return self


def parse_band(s: str) -> tuple[float, float] | None:
    """'' -> None; 'B' -> (1/B, B); 'LO,HI' -> (LO, HI); needs 0 < LO <= 1 <= HI."""
    if not s:
        return None
    try:
        parts = [float(x) for x in s.split(",")]
    except ValueError:
        raise ValueError(f"--mask-band {s!r}: expected B or LO,HI (numbers)") from None
    if len(parts) == 1:
        if parts[0] < 1:
            raise ValueError(f"--mask-band {s!r}: a single value B means [1/B, B] and must be >= 1")
        return 1.0 / parts[0], parts[0]
    if len(parts) != 2 or not 0 < parts[0] <= 1 <= parts[1]:
        raise ValueError(f"--mask-band {s!r}: expected LO,HI with 0 < LO <= 1 <= HI")
    return parts[0], parts[1]


# Fields that define the run: a --resume may not change them.
RUN_DEFINING = ("model", "task", "data", "reward", "seed", "difficulty", "prompts_per_step", "group_size", "chat")


def dump(cfg: RLConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
