"""Verifiable tasks for `ringlinear rl`: prompts generated or read deterministically per step, completions scored.

- `arithmetic`: exact-answer arithmetic generated from the seed (difficulty levels 1-4)
- `code`: write a Python function; scored by running its unit tests in a sandboxed subprocess (`sandbox.py`)
- `jsonl`: a user's prompts (`--data FILE.jsonl`) scored by a user's function (`--reward module:function`)

A task's prompts for step s depend only on (seed, s), so a resumed run sees the prompts it would have seen.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

TASKS = ("arithmetic", "code", "jsonl")


@dataclass
class Prompt:
    text: str                                  # what the model is given (before any chat template)
    meta: dict = field(default_factory=dict)   # what the scorer needs (answer, tests, the user's record)
    messages: list | None = None               # a chat conversation instead of text (jsonl records)


@dataclass
class Score:
    reward: float | None                       # None: the reward could not be computed (left out of the update)
    info: dict = field(default_factory=dict)   # numeric fields are averaged into metrics.jsonl as task/<name>
    error: str | None = None                   # why reward is None


class Task(ABC):
    name = "task"
    stop: tuple[str, ...] = ()                 # stop strings for sampling

    @abstractmethod
    def prompts(self, step: int, n: int) -> list[Prompt]:
        ...

    @abstractmethod
    def score(self, prompts: list[Prompt], completions: list[str]) -> list[Score]:
        ...

    def close(self) -> None:
        pass


def step_rng(seed: int, step: int, salt: str = "") -> random.Random:
    """A generator that depends only on (seed, step, salt): Python's str seeding hashes with SHA-512."""
    return random.Random(f"ringlinear-rl:{salt}:{seed}:{step}")


def epoch_order(n_items: int, seed: int, step: int, n: int) -> list[int]:
    """Indices of the n items of step `step` when items are visited in a fresh shuffle every epoch."""
    perms: dict[int, list[int]] = {}
    out = []
    for k in range(step * n, step * n + n):
        epoch, pos = divmod(k, n_items)
        if epoch not in perms:
            perms[epoch] = list(range(n_items))
            step_rng(seed, epoch, "epoch").shuffle(perms[epoch])
        out.append(perms[epoch][pos])
    return out


def make_task(cfg) -> Task:
    """The task named by cfg.task, from the RL configuration (validated before any model is loaded)."""
    if cfg.task == "arithmetic":
        from .arithmetic import ArithmeticTask
        return ArithmeticTask(cfg.seed, cfg.difficulty, cfg.format_reward)
    if cfg.task == "code":
        from .code import CodeTask
        return CodeTask(cfg.seed, workers=cfg.sandbox_workers)
    if cfg.task == "jsonl":
        from .custom import JsonlTask
        return JsonlTask(cfg.data, cfg.reward, cfg.seed)
    raise ValueError(f"unknown --task {cfg.task!r}; choose one of {TASKS}")
