"""Per-request settings: how to sample (`ringlinear.sampling.Sampling`) plus what the request returns and when it
stops. Frozen and checked once, when built."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling import Sampling, SamplingParamError

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams(Sampling):
    """`Sampling`'s fields (max_tokens, temperature, top_p, top_k, seed) and:

    `stop`: strings that end generation; the matched string is cut from the text (OpenAI semantics).
    `stop_token_ids`: extra ids that end generation (the tokenizer's own stop ids apply unless `ignore_eos`);
    a stop token is kept in `token_ids` but not shown in the text. `logprobs`: return the log-prob of each sampled
    token; `top_logprobs` k > 0 also returns the k most likely tokens per step (and implies `logprobs`). Log-probs
    are those of the model (fp32 log-softmax of the raw logits), not of the tempered/filtered distribution, unless
    `tempered_logprobs`: then fp32 log-softmax(logits / temperature), the distribution the token is drawn from before
    top-k/top-p filtering (what RL's importance ratio needs; `ringlinear.rl.sequence_logprobs` computes the same).
    """

    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tempered_logprobs: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        object.__setattr__(self, "stop", [s for s in stop if s])
        object.__setattr__(self, "stop_token_ids", [int(t) for t in (self.stop_token_ids or [])])
        if self.top_logprobs:
            object.__setattr__(self, "logprobs", True)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise SamplingParamError("top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                                                     f"{self.top_logprobs!r}")
