"""Rollout-vs-training mismatch figures, under the key names `ringlinear rl` logs and `align-check` prints.

Inputs are the log-probs of the same sampled tokens under the rollout engine (q) and the training forward (p),
taken of the same distribution (the same temperature). With d = log p - log q per token, over ALL tokens of the
batch (token-weighted, computed in fp64):

- max_abs_dlogp   = max |d|
- mean_abs_dlogp  = mean |d|
- kl_rollout_train = mean(exp(d) - 1 - d): the k3 estimator of KL(q || p) from tokens drawn from q. Unbiased
  (E_q[p/q] = 1 and E_q[-log(p/q)] = KL(q||p)), never negative, exactly 0 iff every d is 0.
- frac_dp_gt_0.8  = share of tokens with |p - q| > 0.8 in probability (the paper's Fig. 12 metric).

All four are exactly 0 when the two sides agree bit for bit.
"""
from __future__ import annotations

import torch

MISMATCH_KEYS = ("max_abs_dlogp", "mean_abs_dlogp", "kl_rollout_train", "frac_dp_gt_0.8")


def _flat(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).to(torch.float64).cpu()
    parts = [t.detach().reshape(-1).to(torch.float64).cpu() if isinstance(t, torch.Tensor)
             else torch.tensor(t, dtype=torch.float64).reshape(-1) for t in x]  # python floats: no fp32 rounding
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def mismatch_metrics(rollout_logprobs, train_logprobs) -> dict[str, float]:
    """rollout_logprobs, train_logprobs: flat tensors or lists of per-sequence tensors / float lists, same shapes.
    -> {key: float} for the four MISMATCH_KEYS (see the module docstring)."""
    return mismatch_from_sums(mismatch_sums(rollout_logprobs, train_logprobs))


def mismatch_sums(rollout_logprobs, train_logprobs) -> dict[str, float]:
    """The additive pieces of the figures (and the max), so that shards (processes) can be combined: sum the
    `n`, `abs_sum`, `k3_sum`, `dp_count` fields, take the max of `max_abs`, then `mismatch_from_sums`."""
    if not isinstance(rollout_logprobs, torch.Tensor) and not isinstance(train_logprobs, torch.Tensor):
        if len(rollout_logprobs) != len(train_logprobs):
            raise ValueError(f"{len(rollout_logprobs)} rollout sequences but {len(train_logprobs)} training ones")
        for i, (a, b) in enumerate(zip(rollout_logprobs, train_logprobs)):
            if len(a) != len(b):
                raise ValueError(f"sequence {i}: {len(a)} rollout log-probs but {len(b)} training ones")
    q, p = _flat(rollout_logprobs), _flat(train_logprobs)
    if q.shape != p.shape:
        raise ValueError(f"{q.numel()} rollout log-probs but {p.numel()} training ones")
    if q.numel() == 0:
        raise ValueError("no tokens to compare")
    d = p - q
    return {"n": float(d.numel()), "max_abs": float(d.abs().max()), "abs_sum": float(d.abs().sum()),
            "k3_sum": float(torch.expm1(d).sub(d).sum()),
            "dp_count": float(((p.exp() - q.exp()).abs() > 0.8).sum())}


def mismatch_from_sums(s: dict) -> dict[str, float]:
    n = s["n"]
    return {"max_abs_dlogp": s["max_abs"], "mean_abs_dlogp": s["abs_sum"] / n, "kl_rollout_train": s["k3_sum"] / n,
            "frac_dp_gt_0.8": s["dp_count"] / n}
