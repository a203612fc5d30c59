"""Response objects of the OpenAI API (completions, chat completions, their stream chunks, logprobs, usage)."""
from __future__ import annotations

import json
import time

from ..engine.engine import RequestOutput


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
        """Legacy completions format: tokens, token_logprobs, top_logprobs [{token: lp}], text_offset."""
        tokens = [self.token_str(t) for t in token_ids]
        offsets, pos = [], text_offset0
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        top = None
        if tops is not None:
            top = [{self.token_str(i): lp for i, lp in step} for step in tops]
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
    def completion(self, outs: list[RequestOutput], prompt_tokens: int, want_logprobs: bool) -> dict:
        choices = []
        for i, o in enumerate(outs):
            lp = self.completion_logprobs(o.token_ids, o.logprobs, o.top_logprobs) if want_logprobs else None
            choices.append({"index": i, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason})
        return {**self._head("text_completion"), "choices": choices,
                "usage": self.usage(prompt_tokens, sum(len(o.token_ids) for o in outs))}

    def completion_chunk(self, index: int, o: RequestOutput, want_logprobs: bool, offset: int) -> dict:
        lp = None
        if want_logprobs:
            lp = self.completion_logprobs(o.new_token_ids, o.new_logprobs or [], o.new_top_logprobs, offset)
        return {**self._head("text_completion"),
                "choices": [{"index": index, "text": o.delta_text, "logprobs": lp,
                             "finish_reason": o.finish_reason if o.finished else None}]}

    # ------------------------------------------------------------------ chat
    def chat(self, outs: list[RequestOutput], prompt_tokens: int, want_logprobs: bool) -> dict:
        choices = []
        for i, o in enumerate(outs):
            lp = self.chat_logprobs(o.token_ids, o.logprobs, o.top_logprobs) if want_logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": o.text, "refusal": None},
                            "logprobs": lp, "finish_reason": o.finish_reason})
        return {**self._head("chat.completion"), "choices": choices,
                "usage": self.usage(prompt_tokens, sum(len(o.token_ids) for o in outs))}

    def chat_chunk(self, index: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def chat_delta_logprobs(self, o: RequestOutput) -> dict:
        return self.chat_logprobs(o.new_token_ids, o.new_logprobs or [], o.new_top_logprobs)

    def usage_chunk(self, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head(obj), "choices": [], "usage": self.usage(prompt_tokens, completion_tokens)}
