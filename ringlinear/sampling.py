"""Sampling primitives shared by `generate()` and the serving engine, so both pick the same tokens.

Per request: a CPU `torch.Generator` seeded once (the random stream never depends on the device or on other
requests). Greedy is argmax with the lowest index winning ties. Log-probs are the fp32 log-softmax of the raw
logits (before temperature / top-k / top-p), the model's own distribution; with a temperature they are those of the
tempered distribution the token is drawn from (RL needs them: the trainer recomputes exactly this function).
"""
from __future__ import annotations

import torch


MAX_TEMPERATURE = 100.0  # beyond ~10 every token is already near-uniform: a larger value is a client's mistake
SEED_LIMIT = 2 ** 64      # a torch.Generator seed is 64 bits


class SamplingParamError(ValueError):
    """A sampling parameter out of range; `param` names it, so the server can answer 400 with it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


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
    if temperature is not None and temperature > 1e-6 and temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """-> (probs sorted descending fp64, their token ids). Stable sort: ties keep the lowest index first."""
    x = logits.double() / temperature
    vals, idx = torch.sort(x, descending=True, stable=True)
    if top_k and top_k > 0:
        vals, idx = vals[:top_k], idx[:top_k]
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        cum = torch.cumsum(probs, 0)
        keep = int(torch.searchsorted(cum, torch.tensor([top_p], dtype=cum.dtype)).item()) + 1
        probs, idx = probs[:keep], idx[:keep]
        probs = probs / probs.sum()
    return probs, idx


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """logits [V] (any device, fp32) -> token id. One uniform draw per call from `generator` (inverse CDF)."""
    if temperature is None or temperature <= 1e-6:
        return int(torch.argmax(logits).item())
    probs, idx = _filtered_probs(logits.detach().cpu(), temperature, top_k, top_p)
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    cum = torch.cumsum(probs, 0)
    j = min(int(torch.searchsorted(cum, u * cum[-1]).item()), probs.numel() - 1)
    return int(idx[j].item())


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of a [V] log-prob row, ties to the lowest index."""
    vals, idx = torch.sort(logprobs.detach().cpu(), descending=True, stable=True)
    return [(int(i), float(v)) for i, v in zip(idx[:k].tolist(), vals[:k].tolist())]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_sampling(temperature: float, top_k: int, top_p: float, seed: int | None = None) -> None:
    """Every value finite and in range (NaN, inf and 1e308 are refused, not sampled with)."""
    if temperature is not None and not (_number(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise SamplingParamError("temperature", f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] "
                                                f"(0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise SamplingParamError("top_k", f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        raise SamplingParamError("top_p", f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT):
        raise SamplingParamError("seed", f"seed must be an integer in [0, 2**64), got {seed!r}")
