"""The OpenAI-compatible HTTP app (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /health, /stats;
/tokenize, /detokenize, /version and /metrics live in extras.py.

Routes live at module level and find what they serve in `request.app.state.server` (a `ServerState`), so
`create_app` only wires them up. Every error is an OpenAI-style body {"error": {message, type, param, code}} with a
4xx/5xx status, and the server keeps serving. A client that disconnects (streaming or not) has its requests
aborted, which frees their KV blocks and state slots at once. Import this module only when serving: it needs
fastapi.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from ..engine.outputs import RequestError
from . import tools
from .metrics import CountRequests, Metrics, observed
from .openai_format import SSE_DONE, Formatter, sse
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request, pydantic_error_message
from .streaming import SSEResponse, collect, merged, unless_disconnected

log = logging.getLogger(__name__)

# After a body this large, hand freed memory back to the OS (glibc keeps freed heap pages otherwise).
_TRIM_AFTER_BYTES = 256 << 10


def default_max_request_bytes(max_model_len: int) -> int:
    """A request body is read whole and parsed (JSON parsing holds the GIL: ~14 ms per MB of token ids, measured),
    so it is capped: 32 bytes per token of context, at least 1 MiB. A full context as JSON token ids takes about 8
    bytes a token, as escaped CJK text about 9, English text 4: the default leaves 3-8x room (4 MiB for 128K)."""
    return max(1 << 20, 32 * max_model_len)


@dataclass
class ServerState:
    """What the routes serve (`app.state.server`)."""

    engine: AsyncEngine
    model_name: str
    max_request_bytes: int
    drain_timeout: float | None = None
    metrics: Metrics | None = None

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")


def _server(request: Request) -> ServerState:
    return request.app.state.server


def _error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status)


# ---------------------------------------------------------------------- middleware
@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release_memory() -> None:
    """Return the heap pages freed after a large request to the OS (measured: without it RSS stays up)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _bearer_token(header: bytes) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` header (the scheme is case-insensitive, RFC 7235)."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


PROTECTED = ("/tokenize", "/detokenize")  # besides /v1: they use the model's tokenizer, like the API


class AuthMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which interferes with streaming and disconnect detection)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1") or scope["path"] in PROTECTED):
            token = _bearer_token(dict(scope["headers"]).get(b"authorization", b""))
            if token is None or not hmac.compare_digest(token, self.expected):
                resp = _error(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TrimAfterLargeRequests:
    """Pure ASGI: once a request whose body exceeded `_TRIM_AFTER_BYTES` is done (its response sent, its
    prompt, tokens and parsed JSON freed), give the freed heap back to the OS. Measured on the CPU test model, five
    0.9 MB prompts tokenised: RSS 407 -> 716 MiB without, back to 450 MiB with (malloc_trim takes 15-30 ms, on a
    worker thread: ctypes releases the GIL)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = 0

        async def counting():
            nonlocal size
            msg = await receive()
            size += len(msg.get("body", b""))
            return msg
        try:
            await self.app(scope, counting, send)
        finally:
            if size > _TRIM_AFTER_BYTES:
                await asyncio.to_thread(release_memory)


# ---------------------------------------------------------------------- request handling
# An oversized body is read to its end and discarded before its 413 up to this many bytes: a server that answers
# and closes with the client's bytes still unread makes the kernel send a reset, and the client loses the 413 it
# was sent (18 of 120 posts of 10 MB on loopback, 2026-12-02, before the drain). Larger bodies are answered at once.
DRAIN_BYTES = 64 << 20


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or APIError(413) past `limit` bytes, judged on Content-Length and again on the bytes as
    they arrive (a chunked body has no length). An oversized body is still read to its end (up to
    max(4 x limit, DRAIN_BYTES), discarded) before the answer, so the client reads the 413 instead of a reset."""
    declared = request.headers.get("content-length", "")
    declared = int(declared) if declared.isdigit() else None
    drain = max(4 * limit, DRAIN_BYTES)
    chunks, size = [], 0
    if declared is None or declared <= drain:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > drain:
                break
            else:
                chunks.clear()
    if max(size, declared or 0) > limit:
        raise APIError(413, f"the request body ({max(size, declared or 0)} bytes) exceeds this server's limit of "
                            f"{limit} bytes (--max-request-bytes)", code="request_too_large")
    return b"".join(chunks)


async def _accept(request: Request, cls, check_model: bool = True):
    """(server state, request): the body read and size-checked, parsed on the worker pool, validated, the model
    name checked."""
    srv = _server(request)
    req = await srv.engine.offload(parse_request, cls, await read_body(request, srv.max_request_bytes))
    req.validate_request()
    if check_model:
        srv.check_model(req.model)
    return srv, req


async def _submit_all(srv: ServerState, prompts, params, prefix: str,
                      structured_param: str = "response_format") -> list[RequestStream]:
    """One engine request per (prompt, choice), tokenised on the worker pool; all or none are queued. A prompt's
    choices are one group: they share its prefill (`LLMEngine.add_group`). A grammar the engine refuses is a 400
    naming `structured_param` (the request field it came from)."""
    try:  # the checks do not depend on the choice
        ids = [await srv.engine.prepare(p, params[0]) for p in prompts]
    except RequestError as e:
        if e.param != "structured":
            raise
        raise APIError(400, f"{structured_param}: {e}", param=structured_param) from None
    streams: list[RequestStream] = []
    try:
        for p in ids:
            rids = [f"{prefix}-{len(streams) + j}" for j in range(len(params))]
            streams += srv.engine.submit_group(p, params, rids, prepared=True)
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


async def _respond(request, req, streams, prompt_tokens, chunk_object, head, chunks, final, fmt, t0):
    """Non-streaming: wait for every choice (abort on disconnect) and build the body with `final(outs)`.
    Streaming: SSE of `head` chunks, then `chunks(i, output)` per engine output, optional usage, [DONE]. Either
    way the outputs pass the metrics (t0: when the route started)."""
    def abort_all():
        for s in streams:
            s.abort()

    outputs = observed(merged(streams), _server(request).metrics, t0)
    if not req.stream:
        try:
            outs = await unless_disconnected(request, collect(streams, outputs))
        finally:
            abort_all()  # no-op for finished requests; frees the rest if the client left
        # building the body detokenises every log-prob entry: on the worker pool too
        return outs if isinstance(outs, JSONResponse) else await _server(request).engine.offload(final, outs)

    async def events():
        try:
            for c in head:
                yield sse(c)
            async for i, o in outputs:
                for c in chunks(i, o):
                    yield sse(c)
            if req.stream_options and req.stream_options.include_usage:
                done = sum(len(s.last.token_ids) for s in streams)
                yield sse(fmt.usage_chunk(chunk_object, prompt_tokens, done))
        except (EngineDeadError, RequestError) as e:
            yield sse(APIError(500, str(e), type="server_error").body())
        yield SSE_DONE

    return SSEResponse(events(), abort_all, media_type="text/event-stream")


# ---------------------------------------------------------------------- routes
router = APIRouter()


@router.get("/health")
async def health(request: Request):
    engine = _server(request).engine
    if not engine.alive:
        return _error(503, f"engine not running: {engine.error}", type="server_error")
    return {"status": "ok" if engine.accepting else "draining"}


@router.get("/v1/models")
async def models(request: Request):
    srv = _server(request)
    return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": 0,
                                        "owned_by": "ringlinear", "max_model_len": srv.max_model_len}]}


@router.get("/v1/models/{name:path}")
async def model_info(name: str, request: Request):
    srv = _server(request)
    srv.check_model(name)
    return {"id": srv.model_name, "object": "model", "created": 0, "owned_by": "ringlinear"}


@router.get("/stats")
async def stats(request: Request):
    engine = _server(request).engine
    return {**await asyncio.to_thread(engine.call, lambda e: e.stats()), "in_flight": engine.num_in_flight}


@router.post("/v1/completions")
async def completions(request: Request):
    t0 = time.monotonic()
    srv, req = await _accept(request, CompletionRequest)
    prompts = req.prompts()
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    want_lp = req.logprobs is not None
    rid = f"cmpl-{uuid.uuid4().hex}"
    extra = {"structured": req.structured()}
    if req.echo and (want_lp or max_tokens == 0):  # max_tokens=0 is a prompt-only request: the engine scores it
        extra["prompt_logprobs"] = req.logprobs or 0
    params = req.sampling_params(max_tokens, want_lp, req.logprobs or 0, **extra)
    streams = await _submit_all(srv, prompts, params, rid)
    fmt = Formatter(srv.tokenizer, srv.model_name, rid)
    prompt_tokens = sum(s.num_prompt_tokens for s in streams[::req.n])
    # echo: each choice starts with its prompt (a token-id prompt as its text)
    echo = [p if isinstance(p, str) else None for p in prompts for _ in range(req.n)] if req.echo else None
    offsets = [0] * len(streams)
    started = [False] * len(streams)

    def chunks(i, o):
        if echo is not None and not started[i]:
            c = fmt.echo_chunk(i, o, echo[i], want_lp)
            offsets[i] += len(c["choices"][0]["text"])
            yield c
        started[i] = True
        yield fmt.completion_chunk(i, o, want_lp, offsets[i])
        offsets[i] += len(o.delta_text)

    return await _respond(request, req, streams, prompt_tokens, "text_completion", [], chunks,
                          lambda outs: fmt.completion(outs, prompt_tokens, want_lp, echo), fmt, t0)


@router.post("/v1/chat/completions")
async def chat(request: Request):
    t0 = time.monotonic()
    srv, req = await _accept(request, ChatCompletionRequest)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    text = await srv.engine.offload(functools.partial(srv.engine.engine.chat_prompt, messages,
                                                      **req.template_variables()))
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # the rest of the context: the length is known only once tokenised
        ids = await srv.engine.prepare(text, req.sampling_params(1, False, 0)[0])
        max_tokens = max(1, srv.max_model_len - len(ids))
    else:
        ids = text
    want_lp = req.logprobs
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    mode = req.tool_mode
    structured, structured_param = req.structured_spec()
    extra = {"structured": structured}
    if mode.parse and tools.tags_are_special(srv.tokenizer):
        extra["skip_special_tokens"] = False  # the tags must reach the text to be parsed
    params = req.sampling_params(max_tokens, want_lp, req.top_logprobs or 0, **extra)
    streams = await _submit_all(srv, [ids], params, rid, structured_param)
    fmt = Formatter(srv.tokenizer, srv.model_name, rid)
    prompt_tokens = streams[0].num_prompt_tokens
    parsers = [tools.ToolCallParser(mode.parallel) for _ in streams] if mode.parse else None

    def chunks(i, o):
        lp = fmt.chat_delta_logprobs(o) if want_lp else None
        if parsers is None:
            events = [("content", o.delta_text)] if o.delta_text else []
        else:
            events = parsers[i].push(o.delta_text) + (parsers[i].finish() if o.finished else [])
        yield from fmt.chat_delta_chunks(i, events, lp)
        if o.finished:
            calls = parsers is not None and parsers[i].num_calls > 0
            yield fmt.chat_chunk(i, {}, "tool_calls" if calls and o.finish_reason == "stop" else o.finish_reason)

    head = [fmt.chat_chunk(i, {"role": "assistant", "content": ""}) for i in range(len(streams))]
    return await _respond(request, req, streams, prompt_tokens, "chat.completion.chunk", head, chunks,
                          lambda outs: fmt.chat(outs, prompt_tokens, want_lp, mode), fmt, t0)


# ---------------------------------------------------------------------- errors and the app
async def _api_error(request, e: APIError):
    headers = {"Connection": "close"} if e.status == 413 else None  # the rest of the body is not read
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _validation(request, e: RequestValidationError):
    msg, param = pydantic_error_message(e.errors())
    return _error(400, msg, param=param)


async def _request_error(request, e: RequestError):
    return _error(400, str(e), param=e.param, code=e.code)


async def _dead(request, e: EngineDeadError):
    return _error(503, str(e), type="server_error", code="unavailable")


async def _http(request, e: StarletteHTTPException):
    return _error(e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else
                  "server_error")


async def _internal(request, e: Exception):
    log.exception("internal error")
    return _error(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


@asynccontextmanager
async def _lifespan(app):
    yield
    # Uvicorn has already waited for in-flight responses; this covers anything left, then stops the thread.
    srv = app.state.server
    srv.engine.accepting = False
    await srv.engine.wait_idle(srv.drain_timeout)
    srv.engine.shutdown()
    log.info("engine stopped")


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
               drain_timeout: float | None = None, max_request_bytes: int | None = None) -> FastAPI:
    from .extras import router as extras_router  # it imports this module's helpers
    app = FastAPI(title="ringlinear", lifespan=_lifespan)
    metrics = Metrics.create(engine)
    app.state.server = ServerState(engine, model_name,
                                   max_request_bytes or default_max_request_bytes(engine.engine.max_model_len),
                                   drain_timeout, metrics)
    app.add_middleware(TrimAfterLargeRequests)
    if api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key)
    if metrics is not None:  # outermost: 401s count too
        app.add_middleware(CountRequests, metrics=metrics)
    for exc, handler in ((APIError, _api_error), (RequestValidationError, _validation), (RequestError, _request_error),
                         (EngineDeadError, _dead), (StarletteHTTPException, _http), (Exception, _internal)):
        app.add_exception_handler(exc, handler)
    app.include_router(router)
    app.include_router(extras_router)
    return app
