"""Per-request settings: how to sample (`ringlinear.sampling.Sampling`) plus what the request returns and when it
stops. Frozen and checked once, when built."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling import Sampling, SamplingParamError

MAX_TOP_LOGPROBS = 20
STRUCTURED_TYPES = ("json_object", "json_schema", "tagged_json")


@dataclass(frozen=True)
class SamplingParams(Sampling):
    """`Sampling`'s fields (max_tokens, temperature, top_p, top_k, min_p, penalties, logit_bias, seed) and:

    `stop`: strings that end generation; the matched string is cut from the text (OpenAI semantics).
    `stop_token_ids`: extra ids that end generation (the tokenizer's own stop ids apply unless `ignore_eos`);
    a stop token is kept in `token_ids` but not shown in the text. `logprobs`: return the log-prob of each sampled
    token; `top_logprobs` k > 0 also returns the k most likely tokens per step (and implies `logprobs`). Log-probs
    are those of the model (fp32 log-softmax of the raw logits), not of the tempered/filtered distribution, unless
    `tempered_logprobs`: then fp32 log-softmax(logits / temperature), the distribution the token is drawn from before
    top-k/top-p filtering (what RL's importance ratio needs; `ringlinear.rl.sequence_logprobs` computes the same).
    Bias, penalties and the structured-output mask are never part of them.

    `prompt_logprobs` k: also return the log-prob of every prompt token given the ones before it (the first is
    None) and, for k > 0, the k most likely tokens at each prompt position: computed in the prefill, from the same
    logits and with the same log-softmax as the sampled tokens'. With it, max_tokens may be 0: the prompt is
    scored and nothing is generated (lm-evaluation-harness's log-likelihood requests).

    `structured`: constrain the output to a grammar (`engine/structured.py`, needs xgrammar): {"type":
    "json_object"} (any JSON object), {"type": "json_schema", "schema": {...}}, or {"type": "tagged_json",
    "begin": str, "end": str, "schemas": [{...}, ...]} (begin + JSON valid under one of the schemas + end: a forced
    tool call). Generation ends when the grammar is complete.
    """

    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tempered_logprobs: bool = False
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: dict | None = None

    def __post_init__(self):
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        object.__setattr__(self, "stop", [s for s in stop if s])
        object.__setattr__(self, "stop_token_ids", [int(t) for t in (self.stop_token_ids or [])])
        if self.top_logprobs:
            object.__setattr__(self, "logprobs", True)
        super().__post_init__()

    def _least_max_tokens(self) -> int:
        return 0 if self.prompt_logprobs is not None else 1

    def validate(self) -> None:
        super().validate()
        for name in ("top_logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= MAX_TOP_LOGPROBS):
                raise SamplingParamError(name, f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
        _check_structured(self.structured)


def _check_structured(spec) -> None:
    """The shape of `structured` (the grammar library checks the schemas themselves when it compiles them)."""
    if spec is None:
        return

    def bad(msg):
        raise SamplingParamError("structured", f"structured: {msg}")
    if not isinstance(spec, dict) or spec.get("type") not in STRUCTURED_TYPES:
        bad(f"must be a dict whose 'type' is one of {', '.join(STRUCTURED_TYPES)}")
    kind = spec["type"]
    if kind == "json_schema" and not isinstance(spec.get("schema"), dict):
        bad("json_schema needs a 'schema' object")
    if kind == "tagged_json":
        if not (isinstance(spec.get("begin"), str) and isinstance(spec.get("end"), str) and spec["begin"]):
            bad("tagged_json needs 'begin' (non-empty) and 'end' strings")
        schemas = spec.get("schemas")
        if not (isinstance(schemas, list) and schemas and all(isinstance(x, dict) for x in schemas)):
            bad("tagged_json needs a non-empty list of 'schemas' objects")
