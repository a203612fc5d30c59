"""Per-request sampling settings, validated once when the request arrives."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling import SamplingParamError, validate_sampling

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """temperature 0 = greedy (argmax, lowest index on ties). top_k 0 = off. top_p 1 = off.

    `stop`: strings that end generation; the matched string is cut from the text (OpenAI semantics).
    `stop_token_ids`: extra ids that end generation (the tokenizer's own stop ids apply unless `ignore_eos`);
    a stop token is kept in `token_ids` but not shown in the text. `logprobs`: return the log-prob of each sampled
    token; `top_logprobs` k > 0 also returns the k most likely tokens per step. Log-probs are those of the model
    (fp32 log-softmax of the raw logits), not of the tempered/filtered sampling distribution, unless
    `tempered_logprobs`: then fp32 log-softmax(logits / temperature), the distribution the token is drawn from before
    top-k/top-p filtering (what RL's importance ratio needs; `ringlinear.rl.sequence_logprobs` computes the same).
    `seed`: None draws a random seed; with a seed the sampled tokens do not depend on other requests.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tempered_logprobs: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise SamplingParamError("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        validate_sampling(self.temperature, self.top_k, self.top_p, self.seed)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamError("top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                                                     f"{self.top_logprobs}")
        if self.top_logprobs:
            self.logprobs = True

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature <= 1e-6
