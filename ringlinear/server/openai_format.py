"""Response objects of the OpenAI API (completions, chat completions, their stream chunks, logprobs, usage)."""
from __future__ import annotations

import json
import time

from ..engine.outputs import RequestOutput
from . import tools


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Formatter:
    """Builds response dicts for one request (fixed id, creation time and model name)."""

    def __init__(self, tokenizer, model_name: str, request_id: str):
        self.tok = tokenizer
        self.model = model_name
        self.id = request_id
        self.created = int(time.time())
        self._calls_sent: dict[int, int] = {}  # tool calls streamed so far, per choice

    def token_str(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False) if self.tok is not None else str(token_id)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ------------------------------------------------------------------ logprobs
    def completion_logprobs(self, token_ids, logprobs, tops, text_offset0: int = 0) -> dict:
        """Legacy completions format: tokens, token_logprobs, top_logprobs [{token: lp}], text_offset. An echoed
        prompt's first token has no log-prob: None in token_logprobs and top_logprobs."""
        tokens = [self.token_str(t) for t in token_ids]
        offsets, pos = [], text_offset0
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        top = None
        if tops is not None:
            top = [None if step is None else {self.token_str(i): lp for i, lp in step} for step in tops]
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}

    def _entry(self, token_id: int, lp: float) -> dict:
        s = self.token_str(token_id)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    def chat_logprobs(self, token_ids, logprobs, tops) -> dict:
        content = []
        for j, (t, lp) in enumerate(zip(token_ids, logprobs)):
            e = self._entry(t, lp)
            e["top_logprobs"] = [self._entry(i, v) for i, v in tops[j]] if tops is not None else []
            content.append(e)
        return {"content": content, "refusal": None}

    # ------------------------------------------------------------------ completions
    def prompt_text(self, o: RequestOutput, prompt: str | None) -> str:
        """The prompt as echoed: the client's string, or a token-id prompt decoded (special tokens kept)."""
        if prompt is not None:
            return prompt
        return self.tok.decode(o.prompt_token_ids, skip_special_tokens=False) if self.tok is not None else ""

    def _echo_logprobs(self, o: RequestOutput, gen: bool):
        """(ids, log-probs, tops) of the prompt, followed by the generated tokens' when `gen`."""
        ids = list(o.prompt_token_ids) + (list(o.token_ids) if gen else [])
        lps = list(o.prompt_logprobs) + (list(o.logprobs or []) if gen else [])
        tops = None
        if o.prompt_top_logprobs is not None:
            tops = list(o.prompt_top_logprobs) + (list(o.top_logprobs or []) if gen else [])
        return ids, lps, tops

    def completion(self, outs: list[RequestOutput], prompt_tokens: int, want_logprobs: bool,
                   echo: list[str | None] | None = None) -> dict:
        """echo: per choice, its prompt string (None: a token-id prompt) to put before the text."""
        choices = []
        for i, o in enumerate(outs):
            text, lp = o.text, None
            if echo is not None:
                text = self.prompt_text(o, echo[i]) + text
                if want_logprobs:
                    lp = self.completion_logprobs(*self._echo_logprobs(o, True))
            elif want_logprobs:
                lp = self.completion_logprobs(o.token_ids, o.logprobs, o.top_logprobs)
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": o.finish_reason})
        return {**self._head("text_completion"), "choices": choices,
                "usage": self.usage(prompt_tokens, sum(len(o.token_ids) for o in outs))}

    def echo_chunk(self, index: int, o: RequestOutput, prompt: str | None, want_logprobs: bool) -> dict:
        """A stream's first chunk under echo: the prompt text (and its log-probs)."""
        lp = self.completion_logprobs(*self._echo_logprobs(o, False)) if want_logprobs else None
        return {**self._head("text_completion"),
                "choices": [{"index": index, "text": self.prompt_text(o, prompt), "logprobs": lp,
                             "finish_reason": None}]}

    def completion_chunk(self, index: int, o: RequestOutput, want_logprobs: bool, offset: int) -> dict:
        lp = None
        if want_logprobs:
            lp = self.completion_logprobs(o.new_token_ids, o.new_logprobs or [], o.new_top_logprobs, offset)
        return {**self._head("text_completion"),
                "choices": [{"index": index, "text": o.delta_text, "logprobs": lp,
                             "finish_reason": o.finish_reason if o.finished else None}]}

    # ------------------------------------------------------------------ chat
    def chat(self, outs: list[RequestOutput], prompt_tokens: int, want_logprobs: bool,
             mode: tools.ToolMode | None = None) -> dict:
        """mode: how tool calls are read from the text (none parsed without one, or with `mode.parse` false)."""
        choices = []
        for i, o in enumerate(outs):
            lp = self.chat_logprobs(o.token_ids, o.logprobs, o.top_logprobs) if want_logprobs else None
            message = {"role": "assistant", "content": o.text, "refusal": None}
            reason = o.finish_reason
            if mode is not None and mode.parse:
                message["content"], calls = tools.parse(o.text, mode.parallel)
                if calls:
                    message["tool_calls"] = calls
                    reason = "tool_calls" if reason == "stop" else reason
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        return {**self._head("chat.completion"), "choices": choices,
                "usage": self.usage(prompt_tokens, sum(len(o.token_ids) for o in outs))}

    def chat_chunk(self, index: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def chat_delta_chunks(self, index: int, events: list, logprobs=None):
        """Chunks of a stream's (kind, value) events in order: ("content", text) -> delta.content,
        ("tool_call", call) -> delta.tool_calls [{index, id, type, function}] (indices count the choice's calls).
        The step's log-probs go with its first chunk (a content "" chunk when there is none)."""
        calls = self._calls_sent
        if not events and logprobs:
            events = [("content", "")]
        for kind, value in events:
            if kind == "content":
                yield self.chat_chunk(index, {"content": value}, logprobs=logprobs)
            else:
                k = calls.get(index, 0)
                calls[index] = k + 1
                yield self.chat_chunk(index, {"tool_calls": [{"index": k, **value}]}, logprobs=logprobs)
            logprobs = None

    def chat_delta_logprobs(self, o: RequestOutput) -> dict:
        return self.chat_logprobs(o.new_token_ids, o.new_logprobs or [], o.new_top_logprobs)

    def usage_chunk(self, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head(obj), "choices": [], "usage": self.usage(prompt_tokens, completion_tokens)}
