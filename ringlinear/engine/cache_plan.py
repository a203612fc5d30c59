"""How the engine's cache memory is split: KV blocks of the softmax layers, and (with prefix caching) the linear
layers' state snapshots; the state slots themselves are sized by max_num_seqs, before this.

Without --num-kv-blocks the budget is --kv-cache-bytes, or 80% of the GPU's free memory at start (the rest:
activations, CUDA-graph pools, allocator slack), or 1 GiB on the CPU. Prefix caching's snapshots take a tenth of
it unless --state-snapshot-bytes says otherwise; with explicit KV blocks they take a tenth of the memory those
blocks and the state slots use.
"""
from __future__ import annotations

import logging

import torch

from .config import EngineConfig
from .distributed import min_over_ranks
from .kv_cache import PagedKVCache
from .prefix_cache import PrefixCache, SnapshotPool
from .state_pool import StatePool

log = logging.getLogger(__name__)


def cache_budget(config: EngineConfig, device: torch.device) -> int:
    """Bytes for the KV cache (and the state snapshots) when --num-kv-blocks is not given."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    return 1 << 30


def build_caches(config: EngineConfig, softmax: list[int], linear: list[int], states: StatePool, max_pos: int,
                 num_kv_heads: int, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 rank_info=None, ranks=None) -> tuple[PagedKVCache, PrefixCache | None]:
    """-> (the paged KV cache of the `softmax` layers, the prefix cache or None). Heads are this rank's; with
    several ranks every rank takes the block count that fits all of them."""
    caching = config.enable_prefix_caching
    snapshot_bytes = config.state_snapshot_bytes
    if config.num_kv_blocks:
        num_blocks = config.num_kv_blocks
    else:
        budget = cache_budget(config, device)
        if caching and snapshot_bytes is None:
            snapshot_bytes = budget // 10
        if softmax:
            per_block = PagedKVCache.bytes_per_block(len(softmax), config.block_size, num_kv_heads, head_dim, dtype)
            num_blocks = max(1, (budget - (snapshot_bytes if caching else 0)) // per_block)
        else:  # no softmax layer: blocks are bookkeeping only, enough for every slot at full length
            num_blocks = config.max_num_seqs * -(-max_pos // config.block_size)
    if rank_info is not None:
        num_blocks = min_over_ranks(rank_info, num_blocks, ranks)
    kv = PagedKVCache(softmax, num_blocks, config.block_size, num_kv_heads, head_dim, dtype, device)
    if not caching:
        return kv, None
    if snapshot_bytes is None:
        snapshot_bytes = (kv.memory_bytes() + states.memory_bytes()) // 10
    each = SnapshotPool.bytes_per_snapshot(len(linear), num_heads, head_dim)
    num_snapshots = snapshot_bytes // each if each else num_blocks  # all-softmax: snapshots are markers
    snapshots = SnapshotPool(linear, num_snapshots, num_heads, head_dim, device)
    if num_snapshots == 0:
        log.warning("prefix caching: %d bytes hold no state snapshot (%d bytes each): no prefix hits",
                    snapshot_bytes, each)
    return kv, PrefixCache(kv.allocator, snapshots, states, config.block_size, config.state_snapshot_interval,
                           config.prefill_chunk, config.numerics == "aligned")
