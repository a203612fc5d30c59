"""Training for the Ring-linear-2.0 hybrids: `ringlinear train` and `ringlinear convert`.

- `config`: `TrainConfig` (every CLI flag) and the training presets (model shapes: `ringlinear.models.presets`)
- `data`: reading corpora (the embedded stdlib default, .txt/.jsonl/.parquet files, dirs, globs)
- `packing`: tokenised streams packed into fixed-length rows with document boundaries (`cu_seqlens`)
- `bpe`, `prepare`: the run's tokenizer (reused or learnt), document split, tokenised-stream cache
- `optim`, `balance`: AdamW groups, LR schedules; aux-loss-free MoE balancing and the sequence aux loss
- `checkpoint`: atomic training checkpoints (published model layout + optimizer/scheduler/RNG/data state)
- `trainer`: the step (DDP/FSDP, grad accumulation, validation); `loop`: the run around it; `report`: progress,
  metrics, plot
- `convert`: all-softmax GQA checkpoint -> hybrid (paper §4)

Import cost: this package's `__init__` and `config` load no torch (the command line imports them to build its
parser); the trainer loads when `train()` runs, matplotlib and pyarrow (optional) where they are used.
"""
from __future__ import annotations

from .config import TrainConfig, get_train_preset

__all__ = ["TrainConfig", "get_train_preset", "train"]


def train(cfg: TrainConfig):
    """Run training to completion (or to `cfg.stop_at`); returns the summary dict."""
    from .trainer import Trainer  # here, not at the top: `ringlinear --help` should not wait for torch
    return Trainer(cfg).train()
