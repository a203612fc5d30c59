"""What the engine hands back: `RequestOutput` per request and step, `RequestError` for a request it refuses."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import Sequence


class RequestError(ValueError):
    """A request the engine cannot serve (bad prompt, too long, ...); the message is safe to show to a client."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class RequestOutput:
    """One step's news about a request. `new_*` and `delta_text` are this output's part. `token_ids`, `logprobs`
    and `top_logprobs` are the request's own lists, shared rather than copied per token (a copy per output would
    cost O(n^2) over long generations): they keep growing until the output with `finished` set."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]                       # all generated so far (stop token included)
    text: str                                  # all generated text so far (stop strings cut)
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    logprobs: list[float] | None = None        # one per generated token, when requested
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # one per prompt token (the first None), when requested
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None           # "stop", "length" or "abort"
    num_preemptions: int = 0
    ttft_s: float | None = None                # arrival to first token


def output_of(seq: Sequence) -> RequestOutput:
    first = seq.emitted_tokens
    delta, new = seq.take_delta()
    p = seq.params
    return RequestOutput(
        request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=seq.output_token_ids,
        text=seq.text, new_token_ids=new, delta_text=delta,
        logprobs=seq.logprobs if p.logprobs else None,
        top_logprobs=seq.top_logprobs if p.top_logprobs else None,
        new_logprobs=seq.logprobs[first:] if p.logprobs else None,
        new_top_logprobs=seq.top_logprobs[first:] if p.top_logprobs else None,
        prompt_logprobs=seq.prompt_logprobs, prompt_top_logprobs=seq.prompt_top_logprobs,
        finished=seq.finished, finish_reason=seq.finish_reason, num_preemptions=seq.num_preemptions,
        ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time)
