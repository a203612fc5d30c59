"""Paged KV cache for the softmax layers: fixed-size blocks handed out from a free list, per-request block tables.

Every softmax layer owns K and V tensors [num_blocks + 1, block_size, KV, D] in the model dtype. A request's
block table (a list of block ids) maps its token position p to row `table[p // bs] * bs + p % bs` of the
flattened [.., KV, D] view; all softmax layers share the request's table. Block ids come from a `BlockPool`
(reference counts: requests may share blocks, block_pool.py). The extra last block is a scratch target for padded
CUDA-graph rows and is never handed out.
"""
from __future__ import annotations

import torch

from .block_pool import BlockPool


class PagedKVCache:
    def __init__(self, softmax_layers: list[int], num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self._shape, self._dtype, self._device = (num_blocks + 1, block_size, num_kv_heads, head_dim), dtype, device
        self._layers = list(softmax_layers)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.make_storage()
        self.allocator = BlockPool(num_blocks)

    def make_storage(self) -> None:
        """(Re-)create the zeroed K/V tensors (after `free_storage`)."""
        kw = dict(dtype=self._dtype, device=self._device)
        self.k = {i: torch.zeros(self._shape, **kw) for i in self._layers}
        self.v = {i: torch.zeros(self._shape, **kw) for i in self._layers}

    def free_storage(self) -> None:
        """Drop the K/V tensors (RL's training phase); every block must be free and none cached."""
        if self.allocator.num_free != self.num_blocks or self.allocator.num_cached:
            raise RuntimeError("free_storage with KV blocks still in use")
        self.k, self.v = {}, {}

    @staticmethod
    def bytes_per_block(n_softmax_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * n_softmax_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def flat(self, layer_idx: int):
        """(K, V) viewed [(num_blocks + 1) * block_size, KV, D]."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def token_rows(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache rows [end - start] (int64, CPU) of positions start..end-1 of a request."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def copy_block(self, src: int, dst: int) -> None:
        """Block dst gets block src's K/V in every layer (a forked request's own copy of a partial block)."""
        for d in (self.k, self.v):
            for t in d.values():
                t[dst].copy_(t[src])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())
