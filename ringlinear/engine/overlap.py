"""Async scheduling (`EngineConfig.async_scheduling`, on for CUDA by default): a decode step's successor is launched
before the step's tokens reach the host, so the host's work on them (stop checks, detokenising, outputs, the next
schedule) runs while the GPU computes the next step, instead of between two steps with the GPU idle.

How: once a step's tokens are drawn on the device, and before they are copied out, the next step of every running
request (one token each, at position num_tokens) is launched with those device tokens as its input ids (the
"lookahead"). The host then reads the tokens (an event after their copy: it waits for the sampling kernels, not for
the lookahead) and processes them as usual. Requests that finished on this token drop their lookahead row: its KV
write went to their own tail block and its state update to their own slot, both freed now, and any later user of
that memory runs after it on the same stream. The others are committed at position num_tokens + 1, and the next
`step()` samples the lookahead's logits instead of scheduling.

A lookahead is launched only where it is the step the scheduler would choose, bar one case: every running request
sampled this step (no prefill piece is in flight), no request waits while a state slot is free, none can finish
by length on this token, none asks for top log-probs (their lists take host syncs; the sampled tokens'
log-probs are computed on the device and copied out with the tokens), one process (other ranks follow
rank 0's broadcast of host tokens) and there are free KV blocks for every request's next position (no preemption).
Otherwise the engine steps as without it. The case: with every slot taken and a queue, a request that finishes
on this token frees a slot the scheduler would fill in the next step; the lookahead is already running, so that
admission waits one step (a saturated engine with a queue still overlaps). Each row is the same computation as in
the step the scheduler would have run; a finished request's row is computed but not read, so in batch-invariant
numerics (the CPU default, aligned mode) tokens and states are bitwise those of the engine without it, and in
default CUDA numerics a row may differ in its last bits where the batch around it differs (as with any change of
batch).

The decode graph's input copies (cuda_graph.py `load`) are synchronous: they wait for this step's sampling and
token copy, so by the lookahead's replay the tokens are already out, and the GPU idles between the sampling and
the replay for those copies (five small ones and the block-table update; not measured yet). The host's work on
the tokens then runs during the replay.

Nothing between the lookahead's launch and the tokens' event may wait on the stream, or the overlap is gone: a
device tensor indexed by a Python list is one such wait (its index goes through a blocking copy), which is why
decode steps return the logits without a gather (model_runner.py) and rows are dropped here through a pinned index.
The lookahead's logits may be a view of a CUDA graph's output; everything that reads them is enqueued before the
next replay.
"""
from __future__ import annotations

import torch

from ..sampling import sample_batch
from .sampler import by_temperature, group_logprobs, process_rows, sample_rows
from .scheduler import Batch, ScheduledSeq
from .sequence import Sequence, Status


def lookahead_batch(engine, sampling: list[Sequence]) -> Batch | None:
    """The next decode step of `sampling` (this step's sampled requests), with its KV blocks allocated, or None
    where a lookahead is not the step the scheduler would run (module docstring)."""
    sch, kv = engine.scheduler, engine.kv
    if not sampling or engine.ranks is not None or engine.rank_info is not None:
        return None
    if sch.num_waiting and engine.states.num_free:  # someone could be admitted next step: no lookahead holds it
        return None
    if len(sampling) != len(sch.running) or {id(s) for s in sampling} != {id(s) for s in sch.running}:
        return None
    for seq in sampling:
        p = seq.params
        if p.top_logprobs or seq.status is not Status.RUNNING or seq.num_computed != seq.num_tokens:
            return None
        if len(seq.output_token_ids) + 1 >= p.max_tokens or seq.num_tokens + 1 >= seq.max_model_len:
            return None  # finishes by length on this token: its next step is not run
    needs = [kv.blocks_needed(seq.num_tokens + 1) - len(seq.block_table) for seq in sampling]
    if sum(needs) > kv.allocator.num_free:
        return None
    for seq, n in zip(sampling, needs):
        if n > 0:
            seq.block_table += kv.allocator.allocate(n)
    return Batch([ScheduledSeq(seq, seq.num_tokens, 1, True) for seq in sampling])


def _rows(t: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """t[keep] without a host sync: a list index is a blocking copy, which would wait for the lookahead."""
    idx = torch.tensor(keep, dtype=torch.long)
    if t.is_cuda:
        idx = idx.pin_memory().to(t.device, non_blocking=True)
    return t.index_select(0, idx)


class Lookahead:
    """The engine's side of async scheduling: draws a step's tokens, launches the lookahead and holds it until the
    next `step()`. `pending` is (batch, logits [n, V] fp32) of a launched lookahead, or None."""

    def __init__(self, engine):
        self.engine = engine
        self.pending: tuple[Batch, torch.Tensor] | None = None
        self.num_steps = 0  # lookaheads whose logits were sampled (stats: async_scheduled_steps)
        self._host = None   # pinned ([max_num_seqs] int64, [max_num_seqs] fp32): tokens and log-probs copied out

    def sample_and_launch(self, logits: torch.Tensor, sampling: list[Sequence]):
        """logits [n, V] fp32 of `sampling` -> this step's [(token, log-prob or None, None)] like `sample_rows`,
        having launched the lookahead when `lookahead_batch` allows one."""
        eng = self.engine
        look = lookahead_batch(eng, sampling)
        if look is None:
            return sample_rows(logits, sampling, aligned=eng.runner.aligned)
        if logits.device.type != "cuda":  # nothing runs asynchronously here: the same draws as sample_rows
            out = sample_rows(logits, sampling, aligned=eng.runner.aligned)
            self.pending = (look, eng.runner.execute(look, ids=torch.tensor([t for t, _, _ in out])))
            return out
        n, dev = len(sampling), logits.device
        tokens = sample_batch(process_rows(logits, sampling), [s.params for s in sampling],
                              [s.generator for s in sampling])
        groups = by_temperature(sampling)
        lp = torch.zeros(n, dtype=torch.float32, device=dev) if groups else None
        for temp, rows in groups.items():  # what sample_sequences computes, left on the device
            idx = torch.tensor(rows, device=dev)
            lp.index_copy_(0, idx, group_logprobs(logits, tokens, idx, temp, eng.runner.aligned)[0])
        if self._host is None or self._host[0].numel() < n:
            size = max(n, eng.config.max_num_seqs)
            self._host = (torch.empty(size, dtype=torch.long, pin_memory=True),
                          torch.empty(size, dtype=torch.float32, pin_memory=True))
        host_tok, host_lp = self._host[0][:n], self._host[1][:n]
        host_tok.copy_(tokens, non_blocking=True)
        if lp is not None:
            host_lp.copy_(lp, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.pending = (look, eng.runner.execute(look, ids=tokens))
        copied.synchronize()  # the tokens are out; the lookahead keeps the GPU busy meanwhile
        lps = host_lp.tolist() if lp is not None else [None] * n
        return [(t, v if s.params.logprobs else None, None) for t, v, s in zip(host_tok.tolist(), lps, sampling)]

    def settle(self) -> None:
        """This step's tokens are processed: commit the lookahead of the requests that go on, drop the rest."""
        if self.pending is not None:
            self.pending = _going_on(*self.pending)
        if self.pending is not None:
            self.engine.scheduler.commit(self.pending[0])

    def take(self) -> tuple[torch.Tensor, list[Sequence]] | None:
        """The pending lookahead as (logits, sequences) to sample now (requests aborted since dropped), or None."""
        if self.pending is None:
            return None
        look, logits = self.pending
        self.pending = None
        kept = _going_on(look, logits)
        if kept is None:
            return logits[:0], []
        self.num_steps += 1
        return kept[1], [s.seq for s in kept[0].seqs]


def _going_on(look: Batch, logits: torch.Tensor) -> tuple[Batch, torch.Tensor] | None:
    """(look, logits) less the rows of finished (or aborted) requests; None when none is left."""
    keep = [i for i, s in enumerate(look.seqs) if not s.seq.finished]
    if not keep:
        return None
    if len(keep) == len(look.seqs):
        return look, logits
    return Batch([look.seqs[i] for i in keep]), _rows(logits, keep)
