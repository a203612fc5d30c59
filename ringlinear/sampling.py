"""How a token is picked from a logits row, in one place for `generate()`, the serving engine, the CLI and the
server, so all of them pick the same tokens.

`Sampling` holds the parameters, their defaults and their checks; the engine's `SamplingParams` extends it with
what a request returns (stop strings, log-probs). A new parameter is a field and a check here, its use in
`process_logits` (what depends on the tokens so far) or `_filtered_probs` (the filters of the distribution), a field
of the server's request schema and one `generate` flag (docs/contributing.md).

Defaults: temperature 1.0, the model's own distribution, everywhere: as in OpenAI's API, vLLM and transformers
(`ringlinear generate` used 0.7 before; now `--temperature 0.7` asks for it). No top-k, no top-p, no min-p, no
penalties, no bias.

The order, for one fp32 logits row x [V] (docs/serving.md, "Sampling"):
1. `logit_bias`: x[t] += bias[t];
2. `repetition_penalty` r over the distinct tokens of prompt + generated: x[t] / r where x[t] > 0, else x[t] * r;
3. `presence_penalty` p, `frequency_penalty` f over the generated tokens, c[t] their counts:
   x[t] -= f * c[t] + p * (c[t] > 0)  (fp32: f and p rounded to fp32, the product, the sum, the difference);
4. (engine only) the structured-output mask: x[t] = -inf for tokens the grammar does not allow;
5. greedy: argmax(x). Otherwise x / temperature, then top-k, top-p (on the renormalised top-k), then min-p (last,
   as in transformers): keep the tokens whose probability is >= min_p * the largest, a ratio that renormalising
   does not change, so it equals min-p on the full tempered distribution intersected with the top-k/top-p set; and
   one inverse-CDF draw from what is kept.

Per request: a CPU `torch.Generator` seeded once (the random stream never depends on the device or on other
requests). Greedy (temperature 0) is argmax with the lowest index winning ties. Log-probs are the fp32 log-softmax
of the raw logits (before bias, penalties, mask, temperature and filters), the model's own distribution; with a
temperature they are those of the tempered model distribution (RL needs them: the trainer recomputes exactly this
function). Bias, penalties and masks never enter the reported log-probs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-6      # a temperature at or below this is greedy (argmax)
MAX_TEMPERATURE = 100.0  # beyond ~10 every token is already near-uniform: a larger value is a client's mistake
SEED_LIMIT = 2 ** 64     # a torch.Generator seed is 64 bits
MAX_PENALTY = 2.0        # presence / frequency penalties in [-2, 2], OpenAI's range
MAX_REPETITION_PENALTY = 10.0  # HF/vLLM take any r > 0; past ~2 text degrades, 10 is a generous ceiling
MAX_LOGIT_BIAS = 100.0   # OpenAI's range: +-100 bans or forces a token


class SamplingParamError(ValueError):
    """A sampling parameter out of range; `param` names it, so the server can answer 400 with it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_in(x, lo: float, hi: float) -> bool:
    return _number(x) and math.isfinite(x) and lo <= x <= hi


def _token_id(key) -> int:
    """A logit_bias key: an int, or (OpenAI's JSON form) a string of decimal digits."""
    if _integer(key) and key >= 0:
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    raise SamplingParamError("logit_bias", f"logit_bias keys must be token ids (decimal strings such as \"42\"), "
                                           f"got {key!r}")


def _normalise_bias(bias) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise SamplingParamError("logit_bias", f"logit_bias must be a map of token id to bias, got "
                                               f"{type(bias).__name__}")
    out = {}
    for k, v in bias.items():
        if not _finite_in(v, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS):
            raise SamplingParamError("logit_bias", f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, "
                                                   f"{MAX_LOGIT_BIAS:g}], got {v!r} for token {k!r}")
        t = _token_id(k)
        if t in out:
            raise SamplingParamError("logit_bias", f"logit_bias names token {t} twice")
        out[t] = float(v)
    return out or None


@dataclass(frozen=True)
class Sampling:
    """max_tokens: tokens to generate at most. temperature 0 = greedy (argmax, lowest index on ties); top_k 0 =
    off; top_p 1 = off; min_p 0 = off. Penalties: presence / frequency 0 = off (in [-2, 2]), repetition 1 = off
    (in (0, 10]). logit_bias: {token id: bias in [-100, 100]} (keys may be decimal strings, as JSON sends them;
    stored as ints). seed None draws a random seed; with a seed the sampled tokens do not depend on anything else.
    Checked when built: every value finite and in range (NaN, inf and 1e308 are refused, not sampled with). The
    order they apply in: the module docstring."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "logit_bias", _normalise_bias(self.logit_bias))
        self.validate()

    def validate(self) -> None:
        least = self._least_max_tokens()
        if not (_integer(self.max_tokens) and self.max_tokens >= least):
            raise SamplingParamError("max_tokens", f"max_tokens must be an integer >= {least}, got "
                                                   f"{self.max_tokens!r}")
        t = self.temperature
        if not (_number(t) and 0 <= t <= MAX_TEMPERATURE):
            raise SamplingParamError("temperature", f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] "
                                                    f"(0 = greedy), got {t!r}")
        if not (_integer(self.top_k) and self.top_k >= 0):
            raise SamplingParamError("top_k", f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise SamplingParamError("top_p", f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _finite_in(self.min_p, 0, 1):
            raise SamplingParamError("min_p", f"min_p must be a number in [0, 1] (0 = off), got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _finite_in(getattr(self, name), -MAX_PENALTY, MAX_PENALTY):
                raise SamplingParamError(name, f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] "
                                               f"(0 = off), got {getattr(self, name)!r}")
        r = self.repetition_penalty
        if not (_finite_in(r, 0, MAX_REPETITION_PENALTY) and r > 0):
            raise SamplingParamError("repetition_penalty", f"repetition_penalty must be a number in (0, "
                                                           f"{MAX_REPETITION_PENALTY:g}] (1 = off), got {r!r}")
        if self.seed is not None and not (_integer(self.seed) and 0 <= self.seed < SEED_LIMIT):
            raise SamplingParamError("seed", f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    def _least_max_tokens(self) -> int:
        return 1

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the parameters name must exist: a check that needs the model, so it is separate."""
        if self.logit_bias and max(self.logit_bias) >= vocab_size:
            raise SamplingParamError("logit_bias", f"logit_bias token ids must be in [0, {vocab_size}), got "
                                                   f"{max(self.logit_bias)}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW

    @property
    def processes_logits(self) -> bool:
        """Whether `process_logits` changes anything (bias or a penalty is set)."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or \
            self.frequency_penalty != 0.0


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


class TokenHistory:
    """What the penalties read of one request's tokens, kept on the logits' device: a bool mask of the tokens seen
    in prompt + generated [V] and the counts of the generated ones [V] int32. Holds references to the caller's
    token lists (the engine's Sequence, or generate()'s rows) and folds in the tokens appended since the last call,
    so a step costs O(V) on the device and O(new tokens) on the host, never O(sequence)."""

    def __init__(self, prompt_ids: list[int], output_ids: list[int]):
        self.prompt_ids, self.output_ids = prompt_ids, output_ids
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self._folded = 0

    def update(self, vocab_size: int, device) -> None:
        if self.seen is None:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(self.prompt_ids, dtype=torch.long, device=device)] = True
            self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        new = self.output_ids[self._folded:]
        if new:
            t = torch.tensor(new, dtype=torch.long, device=device)
            self.counts.index_add_(0, t, torch.ones(len(new), dtype=torch.int32, device=device))
            self.seen[t] = True
            self._folded = len(self.output_ids)


def process_logits(logits: torch.Tensor, s: Sampling, history: TokenHistory | None) -> torch.Tensor:
    """logits [V] fp32 (any device) -> a new [V] fp32 row with logit_bias, repetition, presence and frequency
    penalties applied (steps 1-3 of the module docstring), on the same device. `history` may be None only when no
    penalty is set. The input row is not modified: its log-probs are reported unprocessed."""
    x = logits.float().clone()
    if s.logit_bias:
        ids = torch.tensor(list(s.logit_bias), dtype=torch.long, device=x.device)
        x[ids] += torch.tensor(list(s.logit_bias.values()), dtype=torch.float32, device=x.device)
    penalised = s.repetition_penalty != 1.0 or s.presence_penalty != 0.0 or s.frequency_penalty != 0.0
    if not penalised:
        return x
    history.update(x.shape[0], x.device)
    if s.repetition_penalty != 1.0:
        r = torch.tensor(s.repetition_penalty, dtype=torch.float32, device=x.device)
        x = torch.where(history.seen, torch.where(x > 0, x / r, x * r), x)
    if s.presence_penalty != 0.0 or s.frequency_penalty != 0.0:
        c = history.counts.float()
        f = torch.tensor(s.frequency_penalty, dtype=torch.float32, device=x.device)
        p = torch.tensor(s.presence_penalty, dtype=torch.float32, device=x.device)
        x = x - (f * c + p * (c > 0).float())
    return x


def _filtered_probs(logits: torch.Tensor, s: Sampling):
    """-> (probs sorted descending fp64, their token ids). Stable sort: ties keep the lowest index first. Tokens at
    -inf (masked) get probability 0 and are never drawn."""
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
    if s.min_p > 0.0:  # sorted descending: the kept tokens are a prefix; probs[0] is the largest
        keep = int((probs >= s.min_p * probs[0]).sum().item())
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


def sample_batch(logits: torch.Tensor, params: list[Sampling], generators: list[torch.Generator | None],
                 rows_per_chunk: int = 32) -> torch.Tensor:
    """logits [n, V] fp32 on any device, one request per row -> token ids [n] int64 on that device, with no host
    sync: `sample` for every row at once (the serving engine on a GPU, where a host sort of a 157K row per token
    made sampled decoding host-bound). The same steps in fp64 (temperature, stable descending sort, top-k, top-p,
    min-p, one inverse-CDF draw of the row's own generator); the kept tokens are a masked prefix instead of a slice,
    so sums run over the zeros beyond it and can differ from `sample` in the last fp64 bit: a different token only
    when a draw lands within ~1e-16 of a CDF step. Every op works row by row, so a row's token does not depend on
    the other rows. Draws come from the CPU generators (one per sampled row, none for greedy rows, as `sample`)."""
    V, dev = logits.shape[1], logits.device
    out = torch.argmax(logits, dim=-1)  # the greedy rows' tokens; lowest index on ties
    rows = [i for i, s in enumerate(params) if not s.greedy]  # only these are sorted
    if not rows:
        return out
    u = torch.tensor([float(torch.rand(1, generator=generators[i], dtype=torch.float64)) for i in rows],
                     dtype=torch.float64).to(dev, non_blocking=True)
    knobs = torch.tensor([[params[i].temperature, params[i].top_k if 0 < params[i].top_k < V else V,
                           params[i].top_p, params[i].min_p] for i in rows],
                         dtype=torch.float64).to(dev, non_blocking=True)  # [m, 4]
    idx_rows = torch.tensor(rows).to(dev, non_blocking=True)
    picked = logits.index_select(0, idx_rows)
    rank = torch.arange(V, device=dev)
    drawn = []
    for lo in range(0, len(rows), rows_per_chunk):  # [c, V] fp64 temporaries, not [m, V]
        x, kn = picked[lo:lo + rows_per_chunk].double(), knobs[lo:lo + rows_per_chunk]
        vals, idx = torch.sort(x / kn[:, :1], dim=-1, descending=True, stable=True)
        kept = kn[:, 1].long()  # top-k (V when off)
        probs = torch.softmax(vals.masked_fill(rank >= kept[:, None], -math.inf), dim=-1)
        top_p = (torch.cumsum(probs, -1) < kn[:, 2:3]).sum(-1) + 1  # first index whose CDF reaches top_p, + 1
        kept = torch.where(kn[:, 2] < 1.0, torch.minimum(kept, top_p), kept)
        probs = probs.masked_fill(rank >= kept[:, None], 0.0)
        min_p = (probs >= kn[:, 3:4] * probs[:, :1]).sum(-1)  # the kept tokens are a sorted prefix
        kept = torch.where(kn[:, 3] > 0.0, torch.minimum(kept, min_p), kept)
        cum = torch.cumsum(probs.masked_fill(rank >= kept[:, None], 0.0), -1)
        j = torch.searchsorted(cum, (u[lo:lo + rows_per_chunk] * cum[:, -1])[:, None])[:, 0]
        j = torch.minimum(j, kept - 1)
        drawn.append(idx.gather(1, j[:, None])[:, 0])
    return out.index_copy(0, idx_rows, torch.cat(drawn))


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of a [V] log-prob row, ties to the lowest index."""
    return top_logprobs_rows(logprobs[None], k)[0]


def top_logprobs_rows(logprobs: torch.Tensor, k: int, rows_per_sort: int = 64) -> list[list[tuple[int, float]]]:
    """The k most likely tokens of each row of [n, V] log-probs (any device), ties to the lowest index. Sorted on
    the rows' device, `rows_per_sort` rows at a time (a sort of [64, 157K] needs ~120 MB, not n times that)."""
    out = []
    for chunk in logprobs.detach().split(rows_per_sort):
        vals, idx = torch.sort(chunk, dim=-1, descending=True, stable=True)
        for v, i in zip(vals[:, :k].cpu().tolist(), idx[:, :k].cpu().tolist()):
            out.append(list(zip(i, v)))
    return out
