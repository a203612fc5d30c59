"""Continuous batching: which requests run this step, with how many tokens, and who gives memory back.

Every step packs up to `max_num_batched_tokens` tokens: first one token for every running request that is
decoding, then the next prefill piece of requests still prefilling, then newly admitted requests (FCFS).

Batch invariance (docs/numerics.md) constrains the policy: a request's prefill is cut at fixed multiples of
`prefill_chunk` counted from its token 0, never at whatever budget happens to be left, so the pieces it is
computed in (and thus its numbers) do not depend on what else is running. A piece that does not fit this step
waits for the next one.

Memory: a request holds one state slot while running and ceil(tokens / block_size) KV blocks. Admission needs a
free slot and the blocks of the first piece plus one spare block per decoding request (so admitting does not force
an immediate preemption). When a running request needs a block and none is free, the most recently arrived
running request is preempted: its slot and blocks are freed and it goes back to the front of the queue, to be
recomputed from token 0 (prompt plus the tokens it already produced).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import EngineConfig
from .kv_cache import PagedKVCache
from .sequence import Sequence, Status
from .state_pool import StatePool


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int       # first position computed this step
    num_tokens: int  # tokens computed this step
    sample: bool     # the step reaches the sequence's last token: sample the next one

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1


@dataclass
class Batch:
    seqs: list[ScheduledSeq]  # single-token entries first (they take the decode kernels), then prefill pieces

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def all_decode(self) -> bool:
        return all(s.is_decode for s in self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: PagedKVCache, states: StatePool):
        self.config = config
        self.kv = kv
        self.states = states
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order: the tail is the first to be preempted
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def release(self, seq: Sequence) -> None:
        """Give back a request's slot and blocks (finish, cancel or preemption)."""
        if seq.block_table:
            self.kv.allocator.free(seq.block_table)
            seq.block_table = []
        if seq.slot is not None:
            self.states.free(seq.slot)
            seq.slot = None
        seq.num_computed = 0

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted request from whichever queue holds it and free its memory now."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ policy
    def _piece(self, seq: Sequence) -> int:
        """Tokens of seq's next piece: the rest up to the next multiple of prefill_chunk (1 when decoding)."""
        C = self.config.prefill_chunk
        return min(seq.num_uncomputed, C - seq.num_computed % C)

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Make room for n more tokens of seq, preempting later arrivals if needed. False: seq must wait."""
        need = self.kv.blocks_needed(seq.num_computed + n) - len(seq.block_table)
        while need > self.kv.allocator.num_free:
            victim = self.running[-1]
            if victim is seq:
                return False
            self._preempt(victim)
        if need > 0:
            seq.block_table += self.kv.allocator.allocate(need)
        return True

    def schedule(self) -> Batch:
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted by an earlier request in this loop
                continue
            n = self._piece(seq)
            if n > budget:
                continue
            if not self._grow(seq, n):
                if seq.num_uncomputed == 1 or len(self.running) == 1:
                    self._preempt(seq)  # the newest request makes way; it recomputes later
                continue
            budget -= n
            item = ScheduledSeq(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens)
            (decodes if n == 1 else prefills).append(item)

        n_decoding = sum(1 for s in self.running if s.num_uncomputed == 1)
        while self.waiting and self.states.num_free > 0:
            seq = self.waiting[0]
            n = self._piece(seq)
            need = self.kv.blocks_needed(n)
            if n > budget or need + n_decoding > self.kv.allocator.num_free:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.slot = self.states.allocate()
            seq.block_table = self.kv.allocator.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= n
            item = ScheduledSeq(seq, 0, n, n == seq.num_tokens)
            (decodes if n == 1 else prefills).append(item)
        return Batch(decodes + prefills)

    def commit(self, batch: Batch) -> None:
        """The step ran: its tokens are now in the cache."""
        for s in batch.seqs:
            s.seq.num_computed = s.start + s.num_tokens
