"""One engine over several ranks (tensor / expert parallelism, one node): `EngineConfig(tensor_parallel=N)` or
`expert_parallel=N`, `ringlinear serve --tp N` / `--ep N`.

The process that creates the `LLMEngine` is rank 0: it starts ranks 1..N-1 as child processes (spawn), and all N
join one torch.distributed group (nccl on CUDA, one GPU per rank; gloo on CPU) plus a gloo group for host
messages. Every rank then runs the same `LLMEngine.__init__` (its shard of the weights, state pool and KV cache of
its heads, the same number of KV blocks: the minimum over ranks, CUDA graphs captured together). Only rank 0
schedules, samples and talks to clients. Each step it broadcasts what the model runner needs (`StepMessage`: per
scheduled sequence its slot, start, token ids of this step and the blocks its table gained since the last step)
and runs the step; the other ranks rebuild the same batch and run it too, in lockstep (their logits are
dropped: the head is replicated, rank 0's are the answer). A rank zeroes a slot's states when a sequence's step
starts at token 0, which is where rank 0's scheduler handed it a zeroed slot.

`LLMEngine.close()` (or the end of the process: the ranks are daemons) stops the other ranks.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import signal
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .scheduler import Batch, ScheduledSeq

log = logging.getLogger(__name__)

_TIMEOUT = datetime.timedelta(minutes=10)  # a first step can compile kernels for minutes on one rank


def parallel_world(config) -> int:
    return max(config.tensor_parallel, config.expert_parallel)


@dataclass
class RankInfo:
    rank: int
    world: int
    group: object       # tensor collectives (the default group)
    host_group: object  # gloo: step messages and setup agreement


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, device: torch.device) -> RankInfo:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=_TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    host = dist.new_group(backend="gloo", timeout=_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return RankInfo(rank, world, dist.group.WORLD, host)


def rank_device(config, rank: int) -> torch.device:
    from ..models.checkpoint import resolve_device
    dev = resolve_device(config.device)
    if dev.type == "cuda":
        if torch.cuda.device_count() < parallel_world(config):
            raise ValueError(f"{parallel_world(config)} ranks need {parallel_world(config)} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
        return torch.device("cuda", rank)
    return dev


class Ranks:
    """Rank 0's handle on the other ranks."""

    def __init__(self, model_dir: str | None, config, world: int, random_weights=None):
        import torch.multiprocessing as mp
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.errors = ctx.SimpleQueue()
        self.procs = [ctx.Process(target=_rank_main, args=(r, world, port, model_dir, config, random_weights,
                                                                     self.errors),
                                  daemon=True, name=f"ringlinear-rank{r}") for r in range(1, world)]
        for p in self.procs:
            p.start()
        self.info = _join(0, world, port, rank_device(config, 0))
        self.sent: dict[tuple, int] = {}  # (request id, preemptions) -> blocks the other ranks know
        self.closed = False

    def failure(self, err: Exception) -> RuntimeError:
        """The error to raise when a collective failed: the other rank's own message when one has died."""
        if not self.errors.empty():
            return RuntimeError(self.errors.get())
        dead = [(r, p) for r, p in enumerate(self.procs, start=1) if not p.is_alive()]
        if dead:
            return RuntimeError(f"rank {dead[0][0]} exited with code {dead[0][1].exitcode}")
        return RuntimeError(f"a collective with the other ranks failed: {err}")


    def send_step(self, batch: Batch) -> None:
        entries, keep = [], {}
        for s in batch.seqs:
            q = s.seq
            key = (q.request_id, q.num_preemptions)
            known = self.sent.get(key, 0)
            tokens = q.token_slice(s.start, s.start + s.num_tokens)
            entries.append((key, q.slot, s.start, s.num_tokens, s.sample, tokens, known, q.block_table[known:]))
            keep[key] = len(q.block_table)
        self.sent = keep  # tables of sequences not in this step are resent whole when they return
        try:
            _broadcast(self.info, StepMessage(entries))
        except RuntimeError as e:
            raise self.failure(e) from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            _broadcast(self.info, None)
        except Exception as e:  # noqa: BLE001  (a dead rank: nothing left to stop)
            log.warning("stopping the other ranks: %s", e)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        dist.destroy_process_group()


@dataclass
class StepMessage:
    entries: list  # (key, slot, start, num_tokens, sample, token ids, table offset, new table blocks)


def min_over_ranks(info: RankInfo, n: int, ranks: Ranks | None = None) -> int:
    """The minimum of n over the ranks (each calls it at the same point of its setup); rank 0 passes `ranks` so
    that a dead rank's own error is raised."""
    t = torch.tensor([n])
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=info.host_group)
    except RuntimeError as e:
        raise (ranks.failure(e) if ranks is not None else e) from None
    return int(t)


def _broadcast(info: RankInfo, msg):
    box = [msg]
    dist.broadcast_object_list(box, src=0, group=info.host_group)
    return box[0]


class _SeqView:
    """The part of a `Sequence` the model runner reads, on a rank that does not schedule (prompt log-probs are
    scored on rank 0 alone: the LM head is replicated and comes after the last collective)."""
    prompt_logprobs = None

    def __init__(self, key, slot, start, tokens, table):
        self.request_id, self.num_preemptions = key
        self.slot, self.block_table = slot, table
        self._start, self._tokens = start, tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        return self._tokens[start - self._start:end - self._start]


def _follow(engine, info: RankInfo) -> None:
    """Ranks 1..N-1: run every step rank 0 broadcasts, until it sends None."""
    tables: dict[tuple, list[int]] = {}
    while True:
        msg = _broadcast(info, None)
        if msg is None:
            return
        seqs, fresh = [], {}
        for key, slot, start, n, sample, tokens, known, new in msg.entries:
            table = tables.get(key, [])[:known] + new
            fresh[key] = table
            seqs.append(ScheduledSeq(_SeqView(key, slot, start, tokens, table), start, n, sample))
            if start == 0:  # rank 0 handed this sequence a zeroed slot
                engine.states.zero(slot)
        tables = fresh
        engine.runner.execute(Batch(seqs))


def _rank_main(rank, world, port, model_dir, config, random_weights, errors):
    from .engine import LLMEngine
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops us
    try:
        info = _join(rank, world, port, rank_device(config, rank))
        engine = LLMEngine(model_dir, config, random_weights=random_weights, _rank=info)
        gc.collect()  # as the server does on rank 0 (server/cli.build_engine): this process lives until exit, and
        gc.freeze()   # a full collection here would stall every rank's step through the collectives
        _follow(engine, info)
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001  (reported to rank 0, which raises it)
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        log.error("rank %d failed:\n%s", rank, traceback.format_exc())
        os._exit(1)  # closes the sockets: rank 0's pending collective fails instead of waiting
