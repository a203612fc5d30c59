"""KV block ids with reference counts and a content index: the allocator behind prefix caching and forking.

A block is held by every request whose block table lists it (`ref`). A block whose content is a known prefix
(`register`: its key names every token up to its end, prefix_cache.py) stays cached when its last holder lets go:
it moves to an LRU list of idle blocks, still findable by its key, and counts as free. `allocate` hands out
never-cached blocks first and then evicts idle cached blocks, least recently used first. Only idle blocks are ever
evicted, so a running request never loses a block it holds.
"""
from __future__ import annotations

from collections import OrderedDict

from .free_list import FreeList


class BlockPool:
    def __init__(self, n: int):
        self.n = n
        self._free = FreeList(n, "KV block")
        self.ref = [0] * n
        self.key_of: dict[int, bytes] = {}       # cached block -> its prefix key
        self.block_of: dict[bytes, int] = {}     # prefix key -> cached block
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now: never-cached free blocks plus idle cached ones."""
        return self._free.num_free + len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self.key_of)

    def num_idle(self, blocks: list[int]) -> int:
        """How many of `blocks` are idle (sharing them takes them off the free count)."""
        return sum(1 for b in blocks if self.ref[b] == 0)

    def allocate(self, k: int) -> list[int]:
        if k > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {k}, {self.num_free} free")
        while self._free.num_free < k:
            self._evict()
        out = self._free.allocate(k)
        for b in out:
            self.ref[b] = 1
        return out

    def share(self, blocks: list[int]) -> list[int]:
        """One more holder of each of `blocks` (cached prefix blocks, or a forked request's parent blocks)."""
        for b in blocks:
            if self.ref[b] == 0:
                if b not in self._idle:
                    raise RuntimeError(f"KV block {b} is neither held nor cached: it cannot be shared")
                del self._idle[b]
            self.ref[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        """One holder less of each block. Freed tail first, so a chain's tail is evicted before its head."""
        for b in reversed(blocks):
            if self.ref[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice or never allocated")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.key_of:
                    self._idle[b] = None
                else:
                    self._free.free([b])

    def register(self, block: int, key: bytes) -> None:
        """`block` (held) holds the prefix named `key`. A key already cached keeps its block (the contents are
        equal); this one then stays private."""
        if key not in self.block_of and block not in self.key_of:
            self.key_of[block] = key
            self.block_of[key] = block

    def cached(self, key: bytes) -> int | None:
        return self.block_of.get(key)

    def _evict(self) -> None:
        b, _ = self._idle.popitem(last=False)
        del self.block_of[self.key_of.pop(b)]
        self._free.free([b])
        self.num_evicted += 1

    def reset(self) -> None:
        """Forget every key (the weights changed, or the storage goes away): idle blocks become free, held ones
        private. Not counted as evictions."""
        for b in self._idle:
            self._free.free([b])
        self._idle.clear()
        self.key_of.clear()
        self.block_of.clear()
