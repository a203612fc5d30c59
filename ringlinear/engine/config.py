"""Engine settings. Defaults suit a single GPU; tests pass small values to exercise preemption and chunking."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..models.context import check_numerics
from ..models.config import RingLinearConfig
from ..models.fp8_serve import check_fp8_dims, check_fp8_runtime, check_quantization, checkpoint_quantization

FP8_ALIGNED = ("numerics='aligned' cannot run FP8 weights: aligned serving reproduces the training forward bit for "
               "bit, and the FP8 GEMMs are not that arithmetic; use numerics='default' with quantization='fp8'")

LIGHTNING_CHUNK = 64  # the chunk of the lightning prefill algorithm; prefill chunks are multiples of it


@dataclass
class EngineConfig:
    max_num_seqs: int = 64               # running requests at once (= linear-state slots)
    max_num_batched_tokens: int = 1024   # per-step token budget (decode tokens + prefill chunks)
    prefill_chunk: int = 512             # a request's prompt is prefilled in pieces of exactly this many tokens
    block_size: int = 16                 # tokens per KV block (softmax layers)
    num_kv_blocks: int | None = None     # None: from kv_cache_bytes / free GPU memory
    kv_cache_bytes: int | None = None    # None: 80% of free GPU memory, or 1 GiB on CPU
    max_model_len: int | None = None     # None: the checkpoint's max_position_embeddings (capped by the cache)
    device: str | None = None            # None: cuda if available else cpu
    dtype: str | None = "auto"           # auto = the checkpoint's torch_dtype
    # Batch invariance: GEMM rows computed in fixed blocks so a row's result never depends on its neighbours.
    # None = on for CPU (measured bitwise), off on CUDA (not verified there; see docs/serving.md).
    batch_invariant: bool | None = None
    row_block: int = 16
    cuda_graphs: bool = True             # replay decode steps from CUDA graphs (CUDA only)
    cuda_graph_max_batch: int = 64
    # Replay steps of fresh prompt pieces (up to 8, at most prefill_graph.MAX_GRAPH_TOKENS tokens) from CUDA graphs
    # (prefill_graph.py); needs cuda_graphs too. On: a 1K prefill of the Ring-mini shape in one step took 14.0
    # instead of 40.9 ms on an H200 (BENCHMARKS.md); only steps of fresh pieces replay (docs/serving.md).
    prefill_cuda_graphs: bool = True
    cpu_threads: int | None = None       # torch intra-op threads on CPU (None: leave torch's default)
    # Launch each decode step's successor before its tokens reach the host, so the host's work on them overlaps the
    # GPU (overlap.py: where it applies, what stays bitwise). None: on for CUDA (H200, batch 64, one run: 7% and 5%
    # off the decode step at 4K and 32K context, BENCHMARKS.md), off on CPU, where nothing runs beside the host.
    async_scheduling: bool | None = None
    # "aligned": every position computed with the arithmetic of the training forward in aligned mode, whatever the
    # batch, chunking or decode step (docs/numerics.md); implies batch invariance. "default": the fastest kernels.
    numerics: str = "default"
    # Prefix caching (docs/serving.md): KV blocks shared by content, linear states snapshotted where a prefill
    # piece ends on a multiple of state_snapshot_interval (None: lcm(prefill_chunk, block_size)), in a pool of
    # state_snapshot_bytes (None: a tenth of the cache memory); n > 1 samples of a prompt share its prefill.
    enable_prefix_caching: bool = True
    state_snapshot_interval: int | None = None
    state_snapshot_bytes: int | None = None
    # Weights: None = as the checkpoint stores them (FP8 when its config.json says so), "fp8" = blockwise e4m3 with
    # 128x128 scales, quantised at load from a bf16/fp32 checkpoint (models/fp8_serve.py), "none" = the model dtype.
    quantization: str | None = None
    # Several ranks (one node; docs/serving.md): tensor_parallel splits attention heads, dense layers and the
    # shared expert, and the routed experts by expert; expert_parallel alone splits only the routed experts.
    tensor_parallel: int = 1
    expert_parallel: int = 1

    def __post_init__(self):
        if self.prefill_chunk < 1 or self.prefill_chunk % LIGHTNING_CHUNK:
            raise ValueError(f"prefill_chunk must be a positive multiple of {LIGHTNING_CHUNK} (chunk boundaries of "
                             f"the lightning algorithm), got {self.prefill_chunk}")
        if self.max_num_batched_tokens < self.prefill_chunk:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= prefill_chunk "
                             f"({self.prefill_chunk})")
        for name in ("max_num_seqs", "block_size", "row_block", "tensor_parallel", "expert_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        check_numerics(self.numerics)
        step = math.lcm(self.prefill_chunk, self.block_size)
        if self.state_snapshot_interval is None:
            self.state_snapshot_interval = step
        elif self.state_snapshot_interval < 1 or self.state_snapshot_interval % step:
            raise ValueError(f"state_snapshot_interval must be a positive multiple of {step} (snapshots are taken "
                             f"where a prefill piece of {self.prefill_chunk} tokens ends, keyed by whole KV blocks "
                             f"of {self.block_size}), got {self.state_snapshot_interval}")
        if self.state_snapshot_bytes is not None and self.state_snapshot_bytes < 0:
            raise ValueError(f"state_snapshot_bytes must be >= 0, got {self.state_snapshot_bytes}")
        check_quantization(self.quantization)
        if self.numerics == "aligned" and self.quantization == "fp8":
            raise ValueError(FP8_ALIGNED)
        if self.numerics == "aligned" and self.batch_invariant is False:
            raise ValueError("numerics='aligned' is batch invariant by construction: batch_invariant=False contradicts it")


def serves_fp8(config: EngineConfig, model_cfg: RingLinearConfig) -> bool:
    """FP8 weights: asked for, or left to a checkpoint whose config.json says it is FP8."""
    return (config.quantization or checkpoint_quantization(model_cfg)) == "fp8"


def check_fp8_before_load(model_dir: str, config: EngineConfig, device) -> None:
    """Every reason to refuse FP8 weights (dims, numerics, device), from config.json, before the weights are read."""
    path = os.path.join(model_dir, "config.json")
    if config.quantization == "none" or not os.path.isfile(path):
        return  # (a missing config is reported by the loader)
    cfg = RingLinearConfig.from_json(path)
    if not serves_fp8(config, cfg):
        return
    if config.numerics == "aligned":
        raise ValueError(FP8_ALIGNED)
    check_fp8_dims(cfg)
    check_fp8_runtime(device)
