"""Training for the Ring-linear-2.0 hybrids: `ringlinear train` and `ringlinear convert`.

- `config`: `TrainConfig` (every CLI flag), presets, the model shapes of the training presets
- `data`: reading corpora (the embedded stdlib default, .txt/.jsonl/.parquet files, dirs, globs)
- `packing`: tokenised streams packed into fixed-length rows with document boundaries (`cu_seqlens`)
- `bpe`: byte-level BPE training and the tokenizer files saved beside every checkpoint
- `optim`, `balance`: AdamW groups, LR schedules; aux-loss-free MoE balancing and the sequence aux loss
- `checkpoint`: atomic training checkpoints (published model layout + optimizer/scheduler/RNG/data state)
- `trainer`: the loop (DDP, grad accumulation, validation, metrics); `report`: progress, metrics, plot
- `convert`: all-softmax GQA checkpoint -> hybrid (paper §4)

Import cost: only torch/numpy at module level; tqdm, matplotlib and pyarrow load where they are used.
"""
from __future__ import annotations

from .config import TrainConfig, get_train_preset

__all__ = ["TrainConfig", "get_train_preset", "train"]


def train(cfg: TrainConfig):
    """Run training to completion (or to `cfg.stop_at`); returns the summary dict."""
    from .trainer import Trainer
    return Trainer(cfg).train()
