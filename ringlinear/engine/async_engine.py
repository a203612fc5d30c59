"""AsyncEngine: the LLMEngine on its own thread, fed from asyncio (the HTTP server).

Only the engine thread touches the engine's state. Coroutines hand it commands (add, abort) through a queue and
receive each request's outputs on an asyncio.Queue via `call_soon_threadsafe`. A request whose consumer goes away
(client disconnect, cancelled task) is aborted, which frees its slot and blocks before the next step.

Work that grows with a request's size (parsing its body, rendering a chat template, tokenising, building a long
response) runs on a small worker pool through `offload`, never on the event loop: a 10 MB prompt must not hold up
the tokens streaming to everyone else. (The tokenizer releases the GIL while it encodes.)
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, workers: int = 2):
        self.engine = engine
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ringlinear-worker")
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.accepting = True
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="ringlinear-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ asyncio side
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def offload(self, fn, *args):
        """fn(*args) on the worker pool, awaited: for work that grows with a request's size."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and check a request on the worker pool (raises RequestError if invalid)."""
        return await self.offload(self.engine.prepare, prompt, params)

    def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
               prepared: bool = False) -> "RequestStream":
        """Validate and queue a request (raises RequestError now if invalid). Iterate the returned stream for
        outputs; call its `abort()` (or let a `finally` do it) when no longer interested. Event-loop thread only.
        `prepared`: prompt is the id list `prepare` returned (otherwise it is tokenised here, on the caller's
        thread)."""
        return self.submit_group(prompt, [params], None if request_id is None else [request_id], prepared)[0]

    def submit_group(self, prompt: str | list[int], params: list[SamplingParams],
                     request_ids: list[str] | None = None, prepared: bool = False) -> list["RequestStream"]:
        """`submit` for len(params) samples of one prompt that share its prefill (`LLMEngine.add_group`)."""
        if not self.accepting or not self.alive:
            raise EngineDeadError("the server is shutting down" if self.alive else f"the engine failed: {self.error}")
        ids = list(prompt) if prepared else self.engine.prepare(prompt, params[0])
        rids = request_ids or [self.new_request_id() for _ in params]
        loop = asyncio.get_running_loop()
        streams = []
        for rid in rids:
            q: asyncio.Queue = asyncio.Queue()
            self._streams[rid] = (loop, q)
            streams.append(RequestStream(self, rid, q, len(ids)))
        self._cmds.put(("add", rids, ids, params))
        return streams

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Async iterator over a request's outputs; leaving it early aborts the request."""
        stream = self.submit(await self.prepare(prompt, params), params, request_id, prepared=True)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def _forget(self, rid: str, abort: bool) -> None:
        if self._streams.pop(rid, None) is not None and abort:
            self._cmds.put(("abort", rid))

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight (drain). False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._streams:
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        self.accepting = False
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def call(self, fn, timeout: float = 10.0):
        """Run fn(engine) on the engine thread and return its result (for stats and tests)."""
        done = threading.Event()
        box: list = []
        self._cmds.put(("call", fn, box, done))
        if not done.wait(timeout):
            raise TimeoutError("engine thread did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, rid: str, item) -> None:
        entry = self._streams.get(rid)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _handle(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rids, ids, params = cmd
            live = [(r, p) for r, p in zip(rids, params) if r in self._streams]  # others: cancelled before
            if not live:
                return
            try:
                self.engine.add_group(ids, [p for _, p in live], [r for r, _ in live], prepared=True)
            except Exception as e:  # noqa: BLE001  (reported to the requests, the engine carries on)
                for r, _ in live:
                    self._deliver(r, e)
        elif kind == "abort":
            self.engine.abort_request(cmd[1])
        elif kind == "call":
            _, fn, box, done = cmd
            try:
                box.append(fn(self.engine))
            except Exception as e:  # noqa: BLE001
                box.append(e)
            done.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                block = not self.engine.has_unfinished()
                cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
                self._handle(cmd)
                while True:  # everything queued before this step
                    self._handle(self._cmds.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001
                log.exception("engine step failed; failing all in-flight requests")
                self.error = e
                for rid in list(self.engine.seqs):
                    self.engine.abort_request(rid)
                    self._deliver(rid, EngineDeadError(f"engine step failed: {e}"))
                return
            for out in outputs:
                self._deliver(out.request_id, out)


class RequestStream:
    """Outputs of one request, in order; the last one has `finished` set."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: asyncio.Queue, num_prompt_tokens: int):
        self.engine, self.request_id, self._q = engine, request_id, q
        self.num_prompt_tokens = num_prompt_tokens
        self.finished = False
        self.last: RequestOutput | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._q.get()
        if isinstance(out, BaseException):
            self.finished = True
            self.engine._forget(self.request_id, abort=False)
            raise out
        self.last = out
        if out.finished:
            self.finished = True
            self.engine._forget(self.request_id, abort=False)
        return out

    def abort(self) -> None:
        """Cancel the request (no-op once finished): the engine frees its slot and blocks before its next step."""
        if not self.finished:
            self.finished = True
            self.engine._forget(self.request_id, abort=True)
