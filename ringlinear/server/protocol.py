"""OpenAI request schemas (strictly typed: a wrong type is a 400, never a silent coercion) and error bodies.

A field the schemas do not name is a 400 naming it (`extra="forbid"`): an option we do not implement is refused,
never silently ignored. The few fields accepted and ignored on purpose are metadata that cannot change the output
(`IGNORED_METADATA`, docs/serving.md).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, PrivateAttr, ValidationError

from ..engine.sampling_params import SamplingParams
from ..engine.structured import XGRAMMAR_MISSING, available as structured_available
from ..sampling import SEED_LIMIT, Sampling, SamplingParamError
from . import tools as tool_calls


class APIError(Exception):
    """Turned into an OpenAI-style error response: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # Unknown fields are refused (400 naming them); known ones must have the documented type.
    model_config = ConfigDict(strict=True, extra="forbid")


# Accepted and ignored by design: they tag or route a request in OpenAI's service and never change the tokens.
IGNORED_METADATA = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                   # extension (0 = off)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None    # extension
    ignore_eos: bool = False                   # extension (benchmarks)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None    # extension (HF/vLLM rule)
    min_p: float | None = None                 # extension
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # metadata, ignored (IGNORED_METADATA)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def structured(self) -> dict | None:
        """`response_format` as the engine's `structured` spec (None for text), or a 400 naming it."""
        rf = self.response_format
        if rf is None or rf.get("type") == "text":
            return None
        kind = rf.get("type")
        if kind == "json_object":
            spec = {"type": "json_object"}
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise APIError(400, "response_format json_schema needs 'json_schema': {'name': ..., 'schema': "
                                    "{...}}", param="response_format")
            spec = {"type": "json_schema", "schema": js["schema"]}
        else:
            raise APIError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got "
                                f"{kind!r}", param="response_format")
        if not structured_available():
            raise APIError(400, XGRAMMAR_MISSING.replace("structured output", "response_format"),
                           param="response_format")
        return spec

    def check_unsupported(self) -> None:
        if not 1 <= self.n <= 16:
            raise APIError(400, f"n must be in [1, 16], got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    # A request parameter whose name differs from the SamplingParams field it sets (errors name the client's).
    _PARAM_NAMES: ClassVar[dict[str, str]] = {}

    def sampling_params(self, max_tokens: int, logprobs: bool, top_logprobs: int, **extra) -> list[SamplingParams]:
        """One SamplingParams per choice; with a seed, choice j samples with seed + j (a reproducible set). The
        checks are SamplingParams' own: a failure is a 400 naming the parameter. `extra`: SamplingParams fields the
        route sets (structured, prompt_logprobs, skip_special_tokens)."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(Sampling)
                 if f.name != "max_tokens" and getattr(self, f.name, None) is not None}
        try:
            sp = SamplingParams(max_tokens=max_tokens, **given, stop=self.stop or [],
                                stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                                logprobs=logprobs, top_logprobs=top_logprobs, **extra)
        except SamplingParamError as e:
            raise APIError(400, str(e), param=self._PARAM_NAMES.get(e.param, e.param)) from None
        if sp.seed is None:
            return [sp] * self.n
        return [dataclasses.replace(sp, seed=(sp.seed + j) % SEED_LIMIT) for j in range(self.n)]


def _prompt(p):
    """One pass over the prompt (pydantic's strict union of the four shapes took ~0.6 s for 3M token ids)."""
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p:
        t = type(p[0])
        if t is str and all(type(x) is str for x in p):
            return p
        if t is int and all(type(x) is int for x in p):
            return p
        if t is list and all(type(r) is list and r and all(type(x) is int for x in r) for r in p):
            return p
    if isinstance(p, list) and not p:
        return p  # reported as "must not be empty" by prompts()
    raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of token-id lists")


class CompletionRequest(_Common):
    _PARAM_NAMES: ClassVar[dict[str, str]] = {"top_logprobs": "logprobs"}
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], PlainValidator(_prompt)]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [p]
        return list(p)

    def validate_request(self) -> None:
        self.check_unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo=true: score the prompt)",
                           param="max_tokens")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, 1, self.n):
            raise APIError(400, "best_of other than n is not supported", param="best_of")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls etc. pass through to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None



class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # extension, e.g. {"enable_thinking": false}
    _tools: Any = PrivateAttr(None)  # tools.ToolMode, set by validate_request

    @property
    def tool_mode(self) -> "tool_calls.ToolMode":
        return self._tools

    def template_variables(self) -> dict[str, Any]:
        """Keyword arguments of the chat template: the defaults, then `chat_template_kwargs`, which may override
        them (e.g. {"add_generation_prompt": false} to continue an assistant turn)."""
        extra = self.chat_template_kwargs or {}
        if "messages" in extra:
            raise APIError(400, "chat_template_kwargs cannot set 'messages' (send them as messages)",
                           param="chat_template_kwargs")
        return {"add_generation_prompt": True, "tools": self.tools, **extra}

    def validate_request(self) -> None:
        self.check_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        try:
            self._tools = tool_calls.check(self.tools, self.tool_choice, self.parallel_tool_calls)
        except tool_calls.ToolError as e:
            raise APIError(400, str(e), param=e.param) from None
        if self.tool_mode.forced and self.structured() is not None:
            raise APIError(400, "response_format cannot be combined with a tool_choice that forces a call",
                           param="response_format")
        if self.tool_mode.forced and not structured_available():
            raise APIError(400, XGRAMMAR_MISSING.replace("structured output", f"tool_choice {self.tool_choice!r}"),
                           param="tool_choice")

    def structured_spec(self) -> tuple[dict | None, str]:
        """(the engine's `structured` spec, the parameter it comes from): a forced tool call or response_format."""
        if self.tool_mode.forced:
            return tool_calls.forced_spec(self.tool_mode), "tool_choice"
        return self.structured(), "response_format"


def parse_request(cls, body: bytes):
    """Request body bytes -> a validated `cls`, or APIError(400) naming what is wrong: bytes that are not UTF-8,
    malformed JSON, a string holding a lone surrogate (valid JSON, not valid text), a wrong type or value."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got a {type(data).__name__}")
    # A surrogate can only come from a \uD800-\uDFFF escape (the UTF-8 decoder refuses encoded ones), so the walk
    # over the parsed values runs only when the bytes hold one: it took 140 ms for a 0.9 MB list of token ids, with
    # the GIL held, stalling every stream meanwhile.
    where = _lone_surrogate(data) if _SURROGATE_ESCAPE.search(body) else None
    if where is not None:
        raise APIError(400, f"'{where}' is not valid Unicode text: it holds a lone surrogate (an unpaired \\uD800-"
                            "\\uDFFF escape)", param=where)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        msg, param = pydantic_error_message(e.errors())
        raise APIError(400, msg, param=param) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(data) -> str | None:
    """Dotted path of the first string (value or key) of parsed JSON that holds a lone surrogate, else None."""
    stack = [(data, "")]
    while stack:
        x, path = stack.pop()
        if isinstance(x, str):
            if _has_surrogate(x):
                return path or "(body)"
        elif isinstance(x, dict):
            for k, v in x.items():
                p = f"{path}.{k}" if path else str(k)
                if _has_surrogate(k):
                    return p
                stack.append((v, p))
        elif isinstance(x, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(x) if isinstance(v, (str, dict, list)))
    return None


def _has_surrogate(s: str) -> bool:
    if s.isascii():  # C speed; a regex scan of 10 MB took 45 ms
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before"}


def pydantic_error_message(errors: list[dict]) -> tuple[str, str | None]:
    """First validation error as (message, param) in OpenAI's wording style. Union-member tags that pydantic puts
    in the location (`prompt.str`, `stop.list[str]`) are dropped so `param` names the client's field."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    loc = [x for x in loc if "[" not in x and x not in _TYPE_TAGS]
    param = ".".join(loc) or None
    if param is None:
        return f"the request body must be a JSON object ({e.get('msg')})", None
    if e.get("type") == "missing":
        return f"missing required parameter: '{param}'", param
    if e.get("type") == "extra_forbidden":
        return f"'{param}' is not supported by this server (docs/serving.md lists the parameters it takes)", param
    return f"invalid type or value for '{param}': {e.get('msg')}", param


class TokenizeRequest(_Strict):
    """vLLM's /tokenize body: a `prompt`, or chat `messages` rendered by the chat template first."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None   # default: true for a prompt, false for messages (the template has them)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def validate_request(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if self.chat_template_kwargs and "messages" in self.chat_template_kwargs:
            raise APIError(400, "chat_template_kwargs cannot set 'messages'", param="chat_template_kwargs")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]

    def validate_request(self) -> None:
        pass
