"""How a token is picked from a logits row, in one place for `generate()`, the serving engine, the CLI and the
server, so all of them pick the same tokens.

`Sampling` holds the parameters, their defaults and their checks; the engine's `SamplingParams` extends it with
what a request returns (stop strings, log-probs). A new parameter is a field and a check here, its use in
`_filtered_probs`, a field of the server's request schema and one `generate` flag (docs/contributing.md).

Defaults: temperature 1.0, the model's own distribution, everywhere: as in OpenAI's API, vLLM and transformers
(`ringlinear generate` used 0.7 before; now `--temperature 0.7` asks for it). No top-k, no top-p.

Per request: a CPU `torch.Generator` seeded once (the random stream never depends on the device or on other
requests). Greedy (temperature 0) is argmax with the lowest index winning ties. Log-probs are the fp32 log-softmax
of the raw logits (before temperature / top-k / top-p), the model's own distribution; with a temperature they are
those of the tempered distribution the token is drawn from (RL needs them: the trainer recomputes exactly this
function).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-6      # a temperature at or below this is greedy (argmax)
MAX_TEMPERATURE = 100.0  # beyond ~10 every token is already near-uniform: a larger value is a client's mistake
SEED_LIMIT = 2 ** 64     # a torch.Generator seed is 64 bits


class SamplingParamError(ValueError):
    """A sampling parameter out of range; `param` names it, so the server can answer 400 with it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Sampling:
    """max_tokens: tokens to generate at most. temperature 0 = greedy (argmax, lowest index on ties); top_k 0 =
    off; top_p 1 = off. seed None draws a random seed; with a seed the sampled tokens do not depend on anything
    else. Checked when built: every value finite and in range (NaN, inf and 1e308 are refused, not sampled with)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not (_integer(self.max_tokens) and self.max_tokens >= 1):
            raise SamplingParamError("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if not (_number(t) and 0 <= t <= MAX_TEMPERATURE):
            raise SamplingParamError("temperature", f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] "
                                                    f"(0 = greedy), got {t!r}")
        if not (_integer(self.top_k) and self.top_k >= 0):
            raise SamplingParamError("top_k", f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise SamplingParamError("top_p", f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (_integer(self.seed) and 0 <= self.seed < SEED_LIMIT):
            raise SamplingParamError("seed", f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW


def make_generator(seed: int | None) -> torch.Generator:
    """Seeds derived by adding to a client's seed (seed + i for row or choice i) wrap modulo 2**64."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) % SEED_LIMIT)
    return g


def log_softmax_fp32(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 log-softmax over the last dim of logits / temperature. temperature 1 (or greedy, <= 1e-6) divides
    nothing, so the result is the raw-logit log-probs bit for bit. top-k / top-p are never applied."""
    x = logits.float()
    if temperature is not None and temperature > GREEDY_BELOW and temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _filtered_probs(logits: torch.Tensor, s: Sampling):
    """-> (probs sorted descending fp64, their token ids). Stable sort: ties keep the lowest index first."""
    x = logits.double() / s.temperature
    vals, idx = torch.sort(x, descending=True, stable=True)
    if s.top_k > 0:
        vals, idx = vals[:s.top_k], idx[:s.top_k]
    probs = torch.softmax(vals, dim=-1)
    if s.top_p < 1.0:
        cum = torch.cumsum(probs, 0)
        keep = int(torch.searchsorted(cum, torch.tensor([s.top_p], dtype=cum.dtype)).item()) + 1
        probs, idx = probs[:keep], idx[:keep]
        probs = probs / probs.sum()
    return probs, idx


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> int:
    """logits [V] (any device, fp32) -> token id. One uniform draw per call from `generator` (inverse CDF)."""
    if s.greedy:
        return int(torch.argmax(logits).item())
    probs, idx = _filtered_probs(logits.detach().cpu(), s)
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    cum = torch.cumsum(probs, 0)
    j = min(int(torch.searchsorted(cum, u * cum[-1]).item()), probs.numel() - 1)
    return int(idx[j].item())


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of a [V] log-prob row, ties to the lowest index."""
    vals, idx = torch.sort(logprobs.detach().cpu(), descending=True, stable=True)
    return [(int(i), float(v)) for i, v in zip(idx[:k].tolist(), vals[:k].tolist())]
