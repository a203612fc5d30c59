"""One request's state: tokens, cache bookkeeping, sampling stream (generator, penalty history, grammar matcher),
prompt log-probs, incremental text and stop detection."""
from __future__ import annotations

import enum
import time

from ..models.tokenizer import StreamDecoder
from ..sampling import TokenHistory, make_generator
from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"    # queued, preempted (its cache freed; it recomputes from token 0), or a pending fork
    RUNNING = "running"    # holds a state slot and KV blocks
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, tokenizer,
                 max_model_len: int, matcher=None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.max_model_len = max_model_len
        self.status = Status.WAITING
        self.num_computed = 0              # tokens whose state/KV are in the cache
        self.block_table: list[int] = []
        self.slot: int | None = None
        self.num_preemptions = 0
        # Prefix caching: chain keys of the token blocks (prefix_cache.py), blocks of the table registered so far.
        self.block_keys: list[bytes] = []
        self.num_registered = 0
        self.promised: list[tuple[int, bytes]] = []  # (boundary, key) its running prefill will record
        self.waited = False                          # held back once for an in-flight prefix (counted once)
        # Samples of one prompt sharing its prefill: the leader holds the others until its prompt is computed,
        # then they fork from it (Scheduler.fork).
        self.forks: list[Sequence] = []
        self.fork_of: Sequence | None = None
        # Seeded once; keeps its position across preemption, so a recomputed request samples what it would have.
        self.generator = None if params.greedy else make_generator(params.seed)
        self.history = TokenHistory(self.prompt_token_ids, self.output_token_ids) if params.processes_logits else None
        self.matcher = matcher             # structured output (engine/structured.py), or None
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        # Prompt token j's log-prob given tokens < j (j = 0 has none), filled piece by piece during prefill.
        want = params.prompt_logprobs is not None
        self.prompt_logprobs: list[float | None] | None = [None] if want else None
        self.prompt_top_logprobs: list | None = [None] if want and params.prompt_logprobs else None
        self.finish_reason: str | None = None
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and tokenizer is not None:
            self.stop_ids |= set(tokenizer.stop_token_ids)
        self._decoder = StreamDecoder(tokenizer, params.skip_special_tokens) if tokenizer is not None else None
        self.text = ""
        self.emitted_chars = 0             # text already handed to the caller (streaming)
        self.emitted_tokens = 0
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    # ------------------------------------------------------------------ tokens
    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output, without concatenating the whole sequence every step."""
        P = len(self.prompt_token_ids)
        if start >= P:
            return self.output_token_ids[start - P:end - P]
        return self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - P)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        """Record a sampled token and decide whether the request is done."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.output_token_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        if self.matcher is not None:
            self.matcher.accept(token)
        if token in self.stop_ids or (self.matcher is not None and self.matcher.terminated):
            self.finish("stop")
            return
        if self._decoder is not None:
            before = len(self.text)
            self.text += self._decoder.push(token)
            if self._check_stop_strings(before):
                return
        if len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish("length")

    def _check_stop_strings(self, before: int) -> bool:
        stops = self.params.stop
        if not stops:
            return False
        start = max(0, before - max(len(s) for s in stops) + 1)
        hits = [(i, s) for s in stops if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        cut = min(hits)[0]
        self.text = self.text[:cut]
        self.finish("stop")
        return True

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        if reason == "length" and self._decoder is not None:
            self.text += self._decoder.flush()
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = time.monotonic()

    # ------------------------------------------------------------------ streaming
    def _held_back(self) -> int:
        """Chars at the end of the text that may be the start of a stop string: not shown until resolved."""
        if self.finished or not self.params.stop:
            return 0
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def take_delta(self) -> tuple[str, list[int]]:
        """Text and token ids not yet handed out."""
        end = max(self.emitted_chars, len(self.text) - self._held_back())
        text = self.text[self.emitted_chars:end]
        toks = self.output_token_ids[self.emitted_tokens:]
        self.emitted_chars = end
        self.emitted_tokens = len(self.output_token_ids)
        return text, toks
