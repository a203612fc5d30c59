"""The RL objective as pure tensor functions (no model, no loop), each checked on hand-computed values.

Per completion token t of sample i (all tensors flat over the tokens of a batch, [M]):

    r_t   = exp(logp_t - old_t)                          the PPO ratio; old = rollout (Eq. 5) or recomputed (Eq. 6)
    pg_t  = -min(r_t A_i, clip(r_t, 1-eps, 1+eps) A_i)   PPO-clip, A_i the sample's advantage
    rho_t = exp(train_old_t - rollout_t)                 training vs rollout probability of the old policy
    w_t   = min(rho_t, C)                                truncated importance sampling (TIS), detached
    m_t   = [lo <= rho_t <= hi]                          token mask outside a ratio band, detached
    k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   KL(pi || pi_ref) estimator (Schulman's k3)
    l_t   = m_t (w_t pg_t + beta k3_t)
    loss  = sum_t a_t l_t                                a_t from `token_weights` (token or sequence aggregation)

Everything is fp32 or wider; the loop chooses which log-probs fill `old` and `train_old` (docs/rl.md).
"""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-6,
                     scale: bool = True) -> torch.Tensor:
    """GRPO advantages. rewards [P, G] (G samples of each of P prompts) -> [P, G] fp64:
    A = (r - mean_g r) / (std_g r + eps), std with Bessel's correction (n - 1) over the group's valid samples;
    scale=False: A = r - mean_g r (no std division).

    valid [P, G] bool: False marks samples whose reward could not be computed; they get A = 0 and are left out of
    their group's mean and std. A group with fewer than 2 valid samples, or all rewards equal, gets A = 0."""
    r = rewards.to(torch.float64)
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    n = v.sum(1, keepdim=True).to(torch.float64)
    rv = torch.where(v, r, torch.zeros_like(r))
    mean = rv.sum(1, keepdim=True) / n.clamp_min(1)
    var = torch.where(v, (r - mean) ** 2, torch.zeros_like(r)).sum(1, keepdim=True) / (n - 1).clamp_min(1)
    adv = (r - mean) / (var.sqrt() + eps) if scale else r - mean
    return torch.where(v & (n >= 2), adv, torch.zeros_like(adv))


def ppo_clip(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_eps: float):
    """-> (pg [M] per-token loss, ratio [M] detached, clipped [M] bool: the clipped branch was taken, i.e. the
    token gives no gradient). logp carries the gradient; old_logp and adv are constants."""
    ratio = torch.exp(logp - old_logp.detach())
    adv = adv.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    pg = -torch.minimum(unclipped, clipped)
    r = ratio.detach()
    was_clipped = ((r > 1 + clip_eps) & (adv > 0)) | ((r < 1 - clip_eps) & (adv < 0))
    return pg, r, was_clipped


def is_ratio(train_old_logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    """rho = pi_train(theta_old) / pi_rollout(theta_old) per token, detached, fp32."""
    return torch.exp(train_old_logp.detach().float() - rollout_logp.detach().float())


def tis_weight(rho: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(rho, cap)."""
    return torch.clamp(rho, max=cap)


def band_mask(rho: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """1.0 where lo <= rho <= hi, else 0.0 (the token is left out of the loss)."""
    return ((rho >= lo) & (rho <= hi)).to(rho.dtype)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) from tokens sampled from (about) pi_theta; >= 0,
    differentiable through logp."""
    x = ref_logp.detach() - logp
    return torch.expm1(x) - x


def token_weights(lens: list[int], mode: str, total_tokens: int | None = None,
                  total_seqs: int | None = None) -> torch.Tensor:
    """Aggregation weights a_t [sum(lens)] fp32, so that loss = sum_t a_t l_t.

    token:    a_t = 1 / total_tokens          (every token counts the same; DAPO's token-level mean)
    sequence: a_t = 1 / (len_i * total_seqs)  (mean over tokens within a sample, then over samples; GRPO's)
    The totals default to this batch's and are passed explicitly when a batch is split into micro-batches or
    processes, so the pieces sum to the loss of the whole."""
    lens_t = torch.tensor(lens, dtype=torch.float64)
    if mode == "token":
        tot = float(lens_t.sum()) if total_tokens is None else float(total_tokens)
        w = torch.full((int(lens_t.sum()),), 1.0 / max(tot, 1.0), dtype=torch.float64)
    elif mode == "sequence":
        n = len(lens) if total_seqs is None else total_seqs
        w = torch.repeat_interleave(1.0 / (lens_t * max(n, 1)), torch.tensor(lens))
    else:
        raise ValueError(f"loss aggregation must be 'token' or 'sequence', got {mode!r}")
    return w.float()


def rl_loss(logp, old_logp, adv_tok, weights, *, clip_eps: float, rho=None, tis_cap: float = 0.0,
            mask_band: tuple[float, float] | None = None, ref_logp=None, kl_coef: float = 0.0):
    """The combined objective of the module docstring. All inputs [M] over the same tokens:
    logp (with grad), old_logp (the ratio's denominator), adv_tok (the sample's advantage per token), weights
    (`token_weights`), rho (`is_ratio`, needed for tis_cap > 0 or mask_band), ref_logp (needed for kl_coef > 0).
    -> (loss scalar, stats: sums over these tokens, to be divided by the token count by the caller)."""
    pg, ratio, clipped = ppo_clip(logp, old_logp, adv_tok, clip_eps)
    per_tok = pg
    stats = {"clipped": float(clipped.sum()), "ratio_sum": float(ratio.double().sum()),
             "ratio_max": float(ratio.max()) if ratio.numel() else 1.0, "ratio_min": float(ratio.min()) if
             ratio.numel() else 1.0, "tokens": float(ratio.numel())}
    if tis_cap > 0:
        w = tis_weight(rho, tis_cap)
        per_tok = per_tok * w
        stats["tis_weight_sum"] = float(w.double().sum())
    if kl_coef > 0:
        kl = k3_kl(logp, ref_logp)
        per_tok = per_tok + kl_coef * kl
        stats["kl_ref_sum"] = float(kl.detach().double().sum())
    if mask_band is not None:
        m = band_mask(rho, *mask_band)
        per_tok = per_tok * m
        stats["masked"] = float((m == 0).sum())
    loss = (per_tok * weights.to(per_tok.device)).sum()
    return loss, stats
