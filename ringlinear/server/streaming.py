"""Responses that watch the client: an SSE stream that aborts its requests when the client goes away, and a
non-streaming wait that does the same; plus the merge of several choices' outputs as they arrive."""
from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.async_engine import RequestStream

log = logging.getLogger(__name__)


class SSEResponse(StreamingResponse):
    """Streams `body_iterator` while watching for the client going away; either way the iterator is closed and
    `on_close` runs (it aborts the engine requests behind the stream, even if the body never started)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        async def stream():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected():
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await self.body_iterator.aclose()
            self.on_close()
        err = results[0]
        if isinstance(err, Exception) and not isinstance(err, (OSError, asyncio.CancelledError)):
            log.error("stream failed: %s: %s", type(err).__name__, err)  # the client sees a cut stream


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, coro):
    """Run coro; if the client disconnects first, cancel it (its finally blocks abort the requests) and return a
    499 response instead of its result."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
    return work.result()


async def merged(streams: list[RequestStream]):
    """(choice index, output) from several streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for out in s:
                await q.put((i, out))
        except Exception as e:  # noqa: BLE001
            await q.put((i, e))
        await q.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item = await q.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def collect(streams: list[RequestStream], pairs=None):
    """Wait for every stream to finish (consuming `pairs`, default `merged(streams)`); their last outputs."""
    async for _ in (merged(streams) if pairs is None else pairs):
        pass
    return [s.last for s in streams]
