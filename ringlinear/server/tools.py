"""Tool calls in the Ring-2.0 format (shared/spec/model.md section 5): the request's `tools` / `tool_choice` checked,
the grammar of a forced call, and `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks parsed out of
the generated text, whole or as it streams, into OpenAI `tool_calls`; the text outside the blocks stays `content`.

A block whose JSON does not parse (or lacks a string `name` and an object `arguments`) is not a call: it stays in
the content as the model wrote it. When the text outside the calls is only whitespace, it is dropped (`content` is null when the
model only called tools). With `parallel_tool_calls=false` only the first block becomes a call; later ones stay
content text. The streamed content, concatenated, equals the non-streamed content: both come from `ToolCallParser`.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

BEGIN, END = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


class ToolError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolMode:
    parse: bool                       # parse tool calls out of the text ("auto", or a forced call)
    forced: list[dict] | None = None  # the functions one of which must be called ("required" / a named one)
    parallel: bool = True


def _check_tool(i: int, t) -> dict:
    where = f"tools.{i}"
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise ToolError(where, f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                               "{...}}}} (function tools are the only kind)")
    f = t["function"]
    if set(t) - {"type", "function"} or set(f) - _FUNCTION_KEYS:
        extra = sorted((set(t) - {"type", "function"}) | (set(f) - _FUNCTION_KEYS))[0]
        raise ToolError(where, f"{where}: '{extra}' is not supported")
    if not (isinstance(f.get("name"), str) and _NAME.fullmatch(f["name"])):
        raise ToolError(f"{where}.function.name", f"{where}.function.name must be 1-64 letters, digits, '_', '-' "
                                                  f"or '.', got {f.get('name')!r}")
    if "parameters" in f and not isinstance(f["parameters"], dict):
        raise ToolError(f"{where}.function.parameters", f"{where}.function.parameters must be a JSON schema object")
    return f


def check(tools, tool_choice, parallel: bool = True) -> ToolMode:
    """Validate `tools` and `tool_choice` (OpenAI's defaults: "auto" with tools, "none" without)."""
    functions = [_check_tool(i, t) for i, t in enumerate(tools or [])]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("tools", "tools: two functions have the same name")
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    if choice == "none":
        return ToolMode(parse=False, parallel=parallel)
    if choice == "auto":
        return ToolMode(parse=bool(functions), parallel=parallel)
    if choice == "required":
        if not functions:
            raise ToolError("tool_choice", "tool_choice 'required' needs tools")
        return ToolMode(parse=True, forced=functions, parallel=parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise ToolError("tool_choice", f"tool_choice names function {name!r}, which is not in tools")
        return ToolMode(parse=True, forced=[functions[names.index(name)]], parallel=parallel)
    raise ToolError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                                   "'function': {'name': ...}}")


def forced_spec(mode: ToolMode) -> dict:
    """The engine's `structured` spec of exactly one call to one of `mode.forced` (its arguments valid under the
    function's parameters schema, any object when it has none)."""
    def call_schema(f):
        return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or {"type": "object"}}}
    return {"type": "tagged_json", "begin": BEGIN, "end": END, "schemas": [call_schema(f) for f in mode.forced]}


def tags_are_special(tokenizer) -> bool:
    """Whether the tool-call tags are special tokens of this vocabulary: then the text must keep special tokens
    (skip_special_tokens=False) or the tags would vanish before they are parsed."""
    if tokenizer is None:
        return False
    added = tokenizer.tokenizer.get_added_tokens_decoder().values()
    return any(t.special and t.content in (BEGIN, END) for t in added)


def _call(block: str) -> dict | None:
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # a JSON string holding the object: keep it as sent if it is one
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class ToolCallParser:
    """push(text delta) / finish() -> events: ("content", str) or ("tool_call", {id, type, function}). Text that
    may be the start of a <tool_call> tag is held until it is resolved."""

    def __init__(self, parallel: bool = True):
        self.parallel = parallel
        self.buf = ""
        self.inside = False
        self.held = ""         # whitespace before any other content: dropped if the content stays blank
        self.spoke = False     # non-whitespace content was emitted (whitespace then passes straight through)
        self.num_calls = 0

    def _content(self, text: str, out: list) -> None:
        if not text:
            return
        if not self.spoke and not text.strip():
            self.held += text
            return
        out.append(("content", self.held + text))
        self.held, self.spoke = "", True

    def push(self, text: str) -> list:
        out: list = []
        self.buf += text
        while True:
            if not self.inside:
                i = self.buf.find(BEGIN)
                if i < 0:
                    keep = next((k for k in range(min(len(BEGIN) - 1, len(self.buf)), 0, -1)
                                 if self.buf.endswith(BEGIN[:k])), 0)
                    self._content(self.buf[:len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                self._content(self.buf[:i], out)
                self.buf, self.inside = self.buf[i + len(BEGIN):], True
            j = self.buf.find(END)
            if j < 0:
                return out
            block, self.buf, self.inside = self.buf[:j], self.buf[j + len(END):], False
            call = _call(block.strip()) if self.parallel or not self.num_calls else None
            if call is None:
                self._content(BEGIN + block + END, out)
            else:
                self.num_calls += 1
                out.append(("tool_call", call))

    def finish(self) -> list:
        """The rest: an unclosed block is content as written; whitespace is dropped if there were calls."""
        out: list = []
        rest = (BEGIN if self.inside else "") + self.buf
        self.buf, self.inside = "", False
        self._content(rest, out)
        if self.held and not self.num_calls:
            out.append(("content", self.held))
        self.held = ""
        return out


def parse(text: str, parallel: bool = True) -> tuple[str | None, list[dict]]:
    """The whole text -> (content, tool calls); content None when there are calls and no other text."""
    p = ToolCallParser(parallel)
    events = p.push(text) + p.finish()
    content = "".join(x for kind, x in events if kind == "content")
    calls = [x for kind, x in events if kind == "tool_call"]
    return (None if calls and not content else content), calls
