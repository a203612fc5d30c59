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

Sharing (prefix_cache.py, with prefix caching on): an admitted request first looks up the longest cached prefix of
its tokens that ends on a state snapshot; it shares those blocks, gets the snapshot copied into its slot and starts
there. A request whose next snapshot boundary a running prefill is about to record (a burst sharing a system
prompt) is held back, keeping its place, while later requests are admitted; it resumes from that snapshot once
recorded, or goes on when that prefill stops (prefix_cache.py `should_wait`). Samples of one prompt
(`LLMEngine.add_group`) wait on their leader and fork from it when its prompt is done.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import EngineConfig
from .kv_cache import PagedKVCache
from .prefix_cache import PrefixCache
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
    def __init__(self, config: EngineConfig, kv: PagedKVCache, states: StatePool,
                 prefix: PrefixCache | None = None):
        self.config = config
        self.kv = kv
        self.states = states
        self.prefix = prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order: the tail is the first to be preempted
        self.num_preemptions = 0
        self.num_forked = 0

    @property
    def num_waiting(self) -> int:
        """Queued requests plus the samples waiting on their leader."""
        return len(self.waiting) + sum(len(s.forks) for s in (*self.waiting, *self.running))

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
        seq.num_computed = seq.num_registered = 0
        if self.prefix:
            self.prefix.withdraw(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted request from whichever queue holds it and free its memory now. Samples
        still waiting on it (it was aborted before its prompt was done) get the first of them as their leader."""
        if seq.fork_of is not None:
            seq.fork_of.forks.remove(seq)
            seq.fork_of = None
        elif seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)
        if seq.forks:
            lead, *rest = seq.forks
            seq.forks, lead.fork_of, lead.forks = [], None, rest
            for s in rest:
                s.fork_of = lead
            self.waiting.appendleft(lead)

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
        pool = self.kv.allocator
        held = []  # requests waiting for a prefix a running prefill is computing; they keep their place
        while self.waiting and self.states.num_free > 0:
            seq = self.waiting[0]
            # a request scoring its prompt (prompt_logprobs) computes every position itself
            cached = self.prefix is not None and seq.params.prompt_logprobs is None
            hit, start = self.prefix.lookup(seq) if cached else ([], 0)
            if cached and self.prefix.should_wait(seq, start):
                held.append(self.waiting.popleft())
                continue
            seq.num_computed = start
            n = self._piece(seq)
            need = self.kv.blocks_needed(start + n) - len(hit)
            if n > budget or need + pool.num_idle(hit) + n_decoding > pool.num_free:
                seq.num_computed = 0
                break  # FCFS: nobody overtakes the head of the queue (held-back requests aside)
            self.waiting.popleft()
            seq.slot = self.states.allocate()
            seq.block_table = pool.share(hit) + pool.allocate(need)  # shared first: allocating may evict idle ones
            if self.prefix:
                self.prefix.admitted(seq, start)
                self.prefix.promise(seq, start)
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= n
            item = ScheduledSeq(seq, start, n, start + n == seq.num_tokens)
            (decodes if n == 1 else prefills).append(item)
        self.waiting.extendleft(reversed(held))
        return Batch(decodes + prefills)

    def commit(self, batch: Batch) -> None:
        """The step ran: its tokens are now in the cache (and in the prefix cache where they may be)."""
        for s in batch.seqs:
            s.seq.num_computed = s.start + s.num_tokens
            if self.prefix:
                self.prefix.record(s.seq, s.start, s.num_tokens)
                self.prefix.fulfil(s.seq)

    def fork(self, leader: Sequence) -> list[Sequence]:
        """leader's prompt is computed: each sample waiting on it takes its full blocks (shared), a copy of its
        partial last block and of its state slot, and decodes on its own from there. A copy rather than a shared
        partial block: each sample writes its own tokens into it, and block tables then only ever grow (the CUDA
        graph step relies on that). Samples that find no free slot or block now wait as ordinary requests.
        Returns the forked ones (running, their first token still to be sampled from the leader's logits)."""
        pending, leader.forks = leader.forks, []
        pool, P = self.kv.allocator, leader.num_computed
        full, partial = divmod(P, self.kv.block_size)
        forked, queued = [], []
        for seq in pending:
            seq.fork_of = None
            if self.states.num_free == 0 or (partial and pool.num_free == 0):
                queued.append(seq)
                continue
            seq.slot = self.states.fork(leader.slot)
            seq.block_table = pool.share(leader.block_table[:full])
            if partial:
                seq.block_table += pool.allocate(1)
                self.kv.copy_block(leader.block_table[full], seq.block_table[-1])
            seq.num_computed, seq.num_registered = P, leader.num_registered
            seq.block_keys = leader.block_keys[:full]
            seq.status = Status.RUNNING
            self.running.append(seq)
            forked.append(seq)
        self.waiting.extendleft(reversed(queued))
        self.num_forked += len(forked)
        return forked
