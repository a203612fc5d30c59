"""Reinforcement learning for the hybrids: `ringlinear rl` (GRPO / PPO-clip on verifiable tasks, rollouts from the
engine on the policy's own weights). Design and equations: docs/rl.md.

- `logprobs`: `sequence_logprobs`, the training forward's log-probs of completion tokens (numerics modes)
- `metrics`: the rollout-vs-training mismatch figures (`MISMATCH_KEYS`), shared with `align-check`
- `losses`: the objective as pure functions (GRPO advantages, PPO-clip, TIS, masking, k3 KL, aggregation)
- `tasks/`: arithmetic, code (sandboxed unit tests), jsonl + a user's reward function
- `rollout`: the engine on the policy's weights; `trainer`: one step; `loop`: the run; `config`, `cli`, `report`
"""
from __future__ import annotations

from ..models.context import NUMERICS
from .logprobs import sequence_logprobs
from .metrics import MISMATCH_KEYS, mismatch_metrics

__all__ = ["sequence_logprobs", "mismatch_metrics", "MISMATCH_KEYS", "NUMERICS", "RLConfig", "train"]


def __getattr__(name):  # lazy: the config pulls in the training package
    if name == "RLConfig":
        from .config import RLConfig
        return RLConfig
    raise AttributeError(f"module 'ringlinear.rl' has no attribute {name!r}")


def train(cfg) -> dict:
    """Run RL to cfg.steps; returns the summary dict."""
    from .loop import run
    from .trainer import RLTrainer
    tr = RLTrainer(cfg)
    try:
        return run(tr)
    finally:
        tr.close()
