"""Prefix caching for the hybrid cache: a new request resumes where an earlier one with the same tokens stood.

Softmax layers need the KV of every earlier position, linear layers only the state at the resume point, so a hit
needs both: the KV blocks of the prefix (shared, reference counted: block_pool.py) and a snapshot of the linear
states at its end. Snapshots are taken where a prefill piece ends on a multiple of `state_snapshot_interval`.

Keys: a hash chain over whole KV blocks, key_i = sha256(key_{i-1} || token ids of block i) (int64 little-endian),
so a key names every token from position 0 to the end of its block. A block is registered under its key, and the
snapshot at boundary b under the key of the block that ends at b. A cryptographic hash because a collision would
silently serve another prompt's cache (and a cheap one could be forced by a client).

Exactness: a resumed request computes exactly the pieces a cold run would after b, from bitwise the same KV and
state, because everything cached was computed the way a cold run computes it:
- default numerics: pieces are cut at multiples of prefill_chunk from token 0 and the interval is a multiple of it,
  so only full pieces that end on a boundary are recorded; decode steps (the recurrent kernel, equal to the chunked
  one in exact arithmetic only) and a prompt's last partial piece never are. On CPU the engine is batch invariant,
  so the result is bitwise the cold run's; on CUDA it is the cold run's up to batch variance (docs/serving.md).
- numerics="aligned": every position has the same arithmetic however it is batched, chunked or decoded, and at a
  multiple of the chunk the open chunk is empty (the state is the whole story), so any step that ends on a
  boundary is recorded, decode steps included: bitwise everywhere.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from .block_pool import BlockPool
from .sequence import Sequence
from .state_pool import StatePool


class SnapshotPool:
    """Linear states at snapshot boundaries: per linear layer [num, H, D, D] fp32 (as the state slots), keyed by
    prefix key, least recently used evicted first. Sized once; never more than `num` snapshots. Nothing holds a
    snapshot (a hit copies it into the request's slot), so every one may be evicted at any time."""

    def __init__(self, linear_layers: list[int], num: int, num_heads: int, head_dim: int, device):
        self.num = num
        self._shape, self._device = (num, num_heads, head_dim, head_dim), device
        self._layers = list(linear_layers)
        self.bytes_each = self.bytes_per_snapshot(len(self._layers), num_heads, head_dim)
        self.states: dict[int, torch.Tensor] = {}
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> snapshot id, least recent first
        self._free = list(range(num - 1, -1, -1))
        self.num_evicted = 0
        self.make_storage()

    @staticmethod
    def bytes_per_snapshot(n_linear_layers: int, num_heads: int, head_dim: int) -> int:
        return n_linear_layers * num_heads * head_dim * head_dim * 4

    def make_storage(self) -> None:
        self.states = {i: torch.zeros(self._shape, dtype=torch.float32, device=self._device) for i in self._layers}

    def free_storage(self) -> None:
        self.reset()
        self.states = {}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def save(self, key: bytes, pool: StatePool, slot: int) -> None:
        """Copy slot's states in as the snapshot `key` (an existing one is only marked recently used)."""
        if key in self._index:
            self._index.move_to_end(key)
            return
        if not self._free:
            self._free.append(self._index.popitem(last=False)[1])
            self.num_evicted += 1
        i = self._free.pop()
        for layer, t in self.states.items():
            t[i].copy_(pool.states[layer][slot])
        self._index[key] = i

    def restore(self, key: bytes, pool: StatePool, slot: int) -> None:
        i = self._index[key]
        self._index.move_to_end(key)
        for layer, t in self.states.items():
            pool.states[layer][slot].copy_(t[i])

    def reset(self) -> None:
        self._free = list(range(self.num - 1, -1, -1))
        self._index.clear()

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())


class PrefixCache:
    def __init__(self, blocks: BlockPool, snapshots: SnapshotPool, states: StatePool, block_size: int,
                 interval: int, prefill_chunk: int, aligned: bool):
        self.blocks, self.snapshots, self.states = blocks, snapshots, states
        self.block_size, self.interval, self.chunk, self.aligned = block_size, interval, prefill_chunk, aligned
        self.num_queries = self.num_hits = self.num_hit_tokens = self.num_waits = 0
        self.in_flight: dict[bytes, int] = {}  # boundary keys running prefills will record -> how many

    def keys(self, seq: Sequence, n: int) -> list[bytes]:
        """The chain keys of seq's first n blocks (computed once per sequence, extended as needed)."""
        keys, bs = seq.block_keys, self.block_size
        while len(keys) < n:
            i = len(keys)
            h = hashlib.sha256(keys[-1] if keys else b"")
            h.update(array("q", seq.token_slice(i * bs, (i + 1) * bs)).tobytes())
            keys.append(h.digest())
        return keys[:n]

    def lookup(self, seq: Sequence) -> tuple[list[int], int]:
        """The longest cached prefix of seq that ends on a snapshot, short of its last token (which must be
        computed to sample from): (its blocks, its length b); ([], 0) when there is none."""
        last = (seq.num_tokens - 1) // self.interval * self.interval
        if last == 0 or not len(self.snapshots):
            return [], 0
        found, best = [], 0
        per = self.interval // self.block_size
        for i, key in enumerate(self.keys(seq, last // self.block_size)):
            block = self.blocks.cached(key)
            if block is None:
                break
            found.append(block)
            if (i + 1) % per == 0 and key in self.snapshots:
                best = i + 1
        return found[:best], best * self.block_size

    def admitted(self, seq: Sequence, b: int) -> None:
        """seq (its slot allocated, the hit's blocks shared) resumes at b: load the snapshot there."""
        self.num_queries += 1
        seq.num_registered = b // self.block_size  # its shared blocks are registered already
        if b:
            self.num_hits += 1
            self.num_hit_tokens += b
            self.snapshots.restore(self.keys(seq, b // self.block_size)[-1], self.states, seq.slot)

    def record(self, seq: Sequence, start: int, n: int) -> None:
        """seq just computed positions start..start+n-1: if that ends on a boundary it may be cached at (see the
        module docstring), register its blocks up to there and snapshot its states."""
        end = start + n
        if end % self.interval or not self.snapshots.num:
            return
        if not self.aligned and not (n == self.chunk and start % self.chunk == 0):
            return
        nb = end // self.block_size
        keys = self.keys(seq, nb)
        for i in range(seq.num_registered, nb):
            self.blocks.register(seq.block_table[i], keys[i])
        seq.num_registered = nb
        self.snapshots.save(keys[-1], self.states, seq.slot)

    # ---- prefixes being computed: a request that would resume at a boundary a running prefill is about to record
    # waits for it instead of computing the same tokens beside it (a burst of requests sharing a system prompt
    # otherwise all miss until the first one's prefill is done).
    def promise(self, seq: Sequence, start: int) -> None:
        """seq runs from `start`: the boundaries up to its length that its prefill pieces will record."""
        if not self.snapshots.num:
            return
        bs, step = self.block_size, self.interval
        for b in range(start + step, seq.num_tokens + 1, step):
            key = self.keys(seq, b // bs)[-1]
            seq.promised.append((b, key))
            self.in_flight[key] = self.in_flight.get(key, 0) + 1

    def fulfil(self, seq: Sequence) -> None:
        """seq's computed tokens passed some promised boundaries: they are recorded now (or never will be)."""
        while seq.promised and seq.promised[0][0] <= seq.num_computed:
            self._drop(seq.promised.pop(0)[1])

    def withdraw(self, seq: Sequence) -> None:
        """seq stops (finished, aborted, preempted): its remaining promises are void."""
        for _, key in seq.promised:
            self._drop(key)
        seq.promised = []

    def _drop(self, key: bytes) -> None:
        n = self.in_flight[key] - 1
        if n:
            self.in_flight[key] = n
        else:
            del self.in_flight[key]

    def should_wait(self, seq: Sequence, start: int) -> bool:
        """Whether seq, which would resume at `start`, shares the next boundary with a running prefill that has
        not recorded it yet: then it waits (a later lookup resumes it further)."""
        b = start + self.interval
        if not self.in_flight or b > (seq.num_tokens - 1) // self.interval * self.interval:
            return False
        if self.keys(seq, b // self.block_size)[-1] not in self.in_flight:
            return False
        if not seq.waited:
            seq.waited = True
            self.num_waits += 1
        return True

    def reset(self) -> None:
        """Forget everything cached (after the weights change; before the storage is freed)."""
        self.blocks.reset()
        self.snapshots.reset()
