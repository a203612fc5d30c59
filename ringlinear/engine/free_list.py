"""The allocator of the engine's two kinds of memory, KV blocks and linear-state slots: a free list of ids."""
from __future__ import annotations


class FreeList:
    """Ids 0..n-1. Handed out lowest first (so runs are reproducible) and reused most recently freed first (still
    warm in cache). Freeing an id twice, or one never handed out, is an error: two owners would share memory."""

    def __init__(self, n: int, what: str):
        self.n, self.what = n, what          # what: "KV block", "linear-state slot" (for the errors)
        self._free = list(range(n - 1, -1, -1))  # a stack: pop() yields 0, 1, 2, ...
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, k: int = 1) -> list[int]:
        if k > len(self._free):
            raise RuntimeError(f"out of {self.what}s: need {k}, {len(self._free)} free")
        out = [self._free.pop() for _ in range(k)]
        self._used.update(out)
        return out

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise RuntimeError(f"{self.what} {i} freed twice or never allocated")
            self._used.remove(i)
        self._free.extend(reversed(ids))  # the last one freed is the first handed out again
