"""The routes around the OpenAI API: /tokenize and /detokenize (vLLM's bodies), /version, /metrics (Prometheus)."""
from __future__ import annotations

import asyncio
import functools

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import __version__
from .app import _accept, _error, _server
from .metrics import METRICS_MISSING
from .protocol import APIError, DetokenizeRequest, TokenizeRequest

router = APIRouter()


def _check_model(srv, name) -> None:
    if name is not None:  # optional here, as in vLLM
        srv.check_model(name)


@router.post("/tokenize")
async def tokenize(request: Request):
    srv, req = await _accept(request, TokenizeRequest, check_model=False)
    _check_model(srv, req.model)
    eng = srv.engine.engine
    if srv.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", param="prompt")
    if req.messages is not None:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        text = await srv.engine.offload(functools.partial(
            eng.chat_prompt, messages, add_generation_prompt=req.add_generation_prompt, tools=req.tools,
            **(req.chat_template_kwargs or {})))
        special = bool(req.add_special_tokens)
    else:
        text, special = req.prompt, req.add_special_tokens is not False
    try:
        ids = await srv.engine.offload(functools.partial(srv.tokenizer.encode, text, add_special_tokens=special))
    except ValueError as e:
        raise APIError(400, f"prompt: {e}", param="prompt") from None
    body = {"count": len(ids), "max_model_len": srv.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [srv.tokenizer.tokenizer.id_to_token(t) for t in ids]
    return body


@router.post("/detokenize")
async def detokenize(request: Request):
    srv, req = await _accept(request, DetokenizeRequest, check_model=False)
    _check_model(srv, req.model)
    V = srv.engine.engine.model_config.vocab_size
    if any(t < 0 or t >= V for t in req.tokens):
        raise APIError(400, f"tokens must be ids in [0, {V})", param="tokens")
    if srv.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", param="tokens")
    text = await srv.engine.offload(functools.partial(srv.tokenizer.decode, req.tokens, skip_special_tokens=False))
    return {"prompt": text}


@router.get("/version")
async def version():
    return {"version": __version__, "torch": torch.__version__}


@router.get("/metrics")
async def metrics(request: Request):
    m = _server(request).metrics
    if m is None:
        return _error(501, METRICS_MISSING, type="server_error")
    body, content_type = await asyncio.to_thread(m.render)  # the engine collector waits for the engine thread
    return Response(body, media_type=content_type)
