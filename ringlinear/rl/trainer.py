"""One RL step: rollout from the engine -> rewards -> group advantages -> PPO-clip updates of the same weights.

One process, or torchrun processes (ringlinear.train.dist): each rank holds a full policy and its own engine,
takes whole prompt groups (prompts_per_step / world of them), and gradients are summed over ranks after every
mini-batch; loss weights are normalised by the global token / sample counts, so the update is that of one process
on the whole batch. The training forward runs in the weights' dtype without autocast: the same arithmetic the
engine runs (docs/rl.md).
"""
from __future__ import annotations

import logging
import math
import time

import torch

from ..train import dist as D
from ..train.checkpoint import load_trainer_state, rng_state, save_checkpoint, set_rng_state
from ..train.optim import lr_factor, make_optimizer
from ..train.trainer import _checked_resume, _claim_out_dir, _on_main
from .config import RUN_DEFINING, RLConfig
from .logprobs import completion_token_stats
from .losses import group_advantages, is_ratio, rl_loss, token_weights
from .metrics import mismatch_from_sums, mismatch_sums
from .rollout import Rollout, check_in_place, param_pointers, sample_seed
from .tasks import make_task

log = logging.getLogger("ringlinear.rl")
STATE_KIND = "ringlinear-rl"


def _dtype(cfg: RLConfig, device: torch.device):
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.float32 if device.type == "cpu" else "auto"


def micro_batches(lens: list[int], idx: list[int], budget: int) -> list[list[int]]:
    """Split sample indices (in order) into runs whose packed tokens fit `budget` (a longer sample goes alone)."""
    out, cur, n = [], [], 0
    for i in idx:
        if cur and n + lens[i] > budget:
            out.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += lens[i]
    return out + ([cur] if cur else [])


class RLTrainer:
    def __init__(self, cfg: RLConfig):
        from ..models.modeling import RingLinearForCausalLM
        from ..models.tokenizer import load_tokenizer
        self.cfg = cfg = cfg.validate()
        self.env = env = D.setup(cfg.device)
        if cfg.prompts_per_step % env.world:
            raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the {env.world} "
                             "processes (each takes whole prompt groups)")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.resume_path, state = None, None
        if cfg.resume:
            self.resume_path = _on_main(env, lambda: _checked_resume(cfg))
            state = load_trainer_state(self.resume_path)
            if state.get("kind") != STATE_KIND:
                raise ValueError(f"{self.resume_path} is not a `ringlinear rl` checkpoint")
            diff = [k for k in RUN_DEFINING if state["config"].get(k) != getattr(cfg, k)]
            if diff:
                raise ValueError(f"--resume continues the saved run; {', '.join('--' + k.replace('_', '-') for k in diff)}"
                                 " differ from it (start a new run with another --out)")
        _on_main(env, lambda: _claim_out_dir(cfg))
        self.tokenizer = load_tokenizer(cfg.model)
        dtype = _dtype(cfg, env.device)
        self.policy = RingLinearForCausalLM.from_pretrained(self.resume_path or cfg.model, dtype=dtype,
                                                            device=env.device)
        self.policy.model.gradient_checkpointing = cfg.grad_checkpointing
        self.ref = None
        if cfg.kl_coef > 0:  # the initial policy, frozen (from --model even when resuming)
            src = RingLinearForCausalLM.from_pretrained(cfg.model, dtype=dtype, device=env.device)
            self.ref = src.eval().requires_grad_(False)
        self.opt = make_optimizer(self.policy, cfg.lr, cfg.weight_decay, (0.9, 0.999), 1e-8, env.device.type)
        total = cfg.steps * cfg.mini_batches
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, total, cfg.warmup_steps, "constant", 1.0, 1.0))
        self.task = make_task(cfg)
        self.rollout = Rollout(self.policy, self.tokenizer, min(cfg.max_num_seqs, self._local_samples()),
                               cfg.max_new_tokens, cfg.keep_engine_cache, numerics=cfg.numerics)
        self.step, self.elapsed = 0, 0.0
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.step, self.elapsed = state["step"], state["elapsed_s"]
            rngs = state["rng"]
            set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
        self.pointers = param_pointers(self.policy)

    def _local_samples(self) -> int:
        return self.cfg.prompts_per_step // self.env.world * self.cfg.group_size

    # ------------------------------------------------------------------ rollout and rewards
    def _encode(self, p) -> list[int]:
        tok = self.tokenizer
        if p.messages is not None or self.cfg.chat:
            msgs = p.messages or [{"role": "user", "content": p.text}]
            p.text = tok.apply_chat_template(msgs, add_generation_prompt=True)
        ids = tok.encode(p.text)
        if not ids:
            raise ValueError(f"a {self.task.name} prompt encodes to zero tokens: {p.text!r}")
        return ids

    def collect(self, step: int):
        """-> (RolloutBatch, rewards [P, G] fp64, valid [P, G], score infos, reward error messages, seconds)."""
        cfg, env = self.cfg, self.env
        n_local = cfg.prompts_per_step // env.world
        first = env.rank * n_local
        prompts = self.task.prompts(step, cfg.prompts_per_step)[first:first + n_local]
        ids = [self._encode(p) for p in prompts]
        G = cfg.group_size
        seeds = [[sample_seed(cfg.seed, step, first + i, g) for g in range(G)] for i in range(n_local)]
        batch = self.rollout.generate(ids, G, seeds, temperature=cfg.temperature, top_p=cfg.top_p,
                                      max_new_tokens=cfg.max_new_tokens, stop=self.task.stop,
                                      ignore_eos=cfg.ignore_eos)
        t0 = time.perf_counter()
        scores = self.task.score([prompts[i] for i in batch.group], batch.texts)
        rewards = torch.tensor([0.0 if s.reward is None else s.reward for s in scores],
                               dtype=torch.float64).view(n_local, G)
        valid = torch.tensor([s.reward is not None for s in scores]).view(n_local, G)
        errors = [s.error for s in scores if s.error]
        return batch, rewards, valid, scores, errors, time.perf_counter() - t0

    # ------------------------------------------------------------------ training phase
    def _stats(self, model, batch, idx):
        """Training-forward log-probs and entropies of samples idx (flat over their tokens)."""
        c = self.cfg
        return completion_token_stats(model, [batch.prompt_ids[i] for i in idx],
                                      [batch.completion_ids[i] for i in idx], c.numerics, c.temperature)

    @torch.no_grad()
    def _forward_all(self, model, batch, idx):
        """No-grad log-probs of samples idx, micro-batched -> {sample: [len] tensor}."""
        lens = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        out = {}
        for mb in micro_batches(lens, idx, self.cfg.micro_batch_tokens):
            lp, _, ls = self._stats(model, batch, mb)
            out.update(zip(mb, lp.split(ls)))
        return out

    def _global(self, *xs) -> list[float]:
        """Sums over processes (the values themselves in one process)."""
        t = torch.tensor(xs, dtype=torch.float64, device=self.env.device)
        return D.all_reduce_sum(self.env, t).tolist()

    def _global_max(self, *xs) -> list[float]:
        t = torch.tensor(xs, dtype=torch.float64, device=self.env.device)
        return D.all_reduce_max(self.env, t).tolist()

    def train_on(self, batch, adv: torch.Tensor, valid: torch.Tensor) -> dict:
        cfg, env = self.cfg, self.env
        dev = env.device
        idx = [k for k in range(len(batch.completion_ids)) if bool(valid.view(-1)[k])]
        adv_flat = adv.reshape(-1)
        lens = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        self.policy.train()
        recomputed = self._forward_all(self.policy, batch, idx) if cfg.old_logprobs == "recompute" else None
        ref = self._forward_all(self.ref, batch, idx) if self.ref is not None else None
        train_old = dict(recomputed) if recomputed is not None else {}
        agg = {"clipped": 0.0, "tokens": 0.0, "ratio_sum": 0.0, "tis_weight_sum": 0.0, "kl_ref_sum": 0.0,
               "masked": 0.0, "entropy_sum": 0.0, "loss": 0.0, "ratio_max": -math.inf, "ratio_min": math.inf}
        grad_norms, trained_tokens = [], 0
        shares = [idx[i::cfg.mini_batches] for i in range(cfg.mini_batches)]  # interleaved: every share sees groups
        for mi, share in enumerate(shares):
            n_tok = sum(len(batch.completion_ids[k]) for k in share)
            tot_tok, tot_seq = self._global(n_tok, len(share))
            for mb in micro_batches(lens, share, cfg.micro_batch_tokens):
                logp, ent, ls = self._stats(self.policy, batch, mb)
                rollout_lp = torch.cat([batch.logprobs[k] for k in mb]).to(dev)
                if recomputed is None and mi == 0:  # theta is still theta_old: this forward is pi_train(theta_old)
                    train_old.update(zip(mb, logp.detach().split(ls)))
                # Eq. 5: the ratio's denominator is the rollout's; Eq. 6: the recomputed training forward's. rho
                # (TIS, masking) compares the training side at theta_old with the rollout: after the first update of
                # a step without recompute, the current forward stands in for theta_old.
                old = rollout_lp if recomputed is None else torch.cat([recomputed[k] for k in mb])
                t_old = logp.detach() if recomputed is None else old
                rho = is_ratio(t_old, rollout_lp) if (cfg.tis_cap > 0 or cfg.band) else None
                adv_tok = torch.cat([adv_flat[k].expand(len(batch.completion_ids[k])) for k in mb]).to(dev).float()
                w = token_weights(ls, cfg.loss_agg, total_tokens=int(tot_tok), total_seqs=int(tot_seq)).to(dev)
                loss, st = rl_loss(logp, old, adv_tok, w, clip_eps=cfg.clip_eps, rho=rho, tis_cap=cfg.tis_cap,
                                   mask_band=cfg.band, ref_logp=None if ref is None else torch.cat([ref[k] for k in mb]),
                                   kl_coef=cfg.kl_coef)
                loss.backward()
                for k in ("clipped", "tokens", "ratio_sum", "tis_weight_sum", "kl_ref_sum", "masked"):
                    agg[k] += st.get(k, 0.0)
                agg["ratio_max"] = max(agg["ratio_max"], st["ratio_max"])
                agg["ratio_min"] = min(agg["ratio_min"], st["ratio_min"])
                agg["entropy_sum"] += float(ent.double().sum())
                agg["loss"] += float(loss.detach())
                trained_tokens += sum(lens[k] for k in mb)
            grad_norms.append(self._update())
        self.policy.eval()
        # Mismatch of the old policy: the engine's log-probs vs the training forward's at theta_old (all samples when
        # recomputed; the first mini-batch's otherwise, which is all of them unless --mini-batches > 1).
        seen = sorted(train_old)
        mm = (mismatch_sums([batch.logprobs[k] for k in seen], [train_old[k] for k in seen]) if seen else
              {"n": 0.0, "max_abs": 0.0, "abs_sum": 0.0, "k3_sum": 0.0, "dp_count": 0.0})
        keys = ("clipped", "tokens", "ratio_sum", "tis_weight_sum", "kl_ref_sum", "masked", "entropy_sum", "loss")
        tot = dict(zip(keys, self._global(*(agg[k] for k in keys))))
        mkeys = ("n", "abs_sum", "k3_sum", "dp_count")
        mm.update(zip(mkeys, self._global(*(mm[k] for k in mkeys))))
        rmax, neg_rmin, mm["max_abs"] = self._global_max(agg["ratio_max"], -agg["ratio_min"], mm["max_abs"])
        if tot["tokens"] == 0:  # nothing trained (every reward malformed): report neutral ratios
            rmax, neg_rmin = 1.0, -1.0
        tok = max(tot["tokens"], 1.0)
        out = {"loss": tot["loss"] / cfg.mini_batches, "grad_norm": sum(grad_norms) / len(grad_norms),
               "clip_frac": tot["clipped"] / tok, "ratio_mean": tot["ratio_sum"] / tok, "ratio_max": rmax,
               "ratio_min": -neg_rmin, "entropy": tot["entropy_sum"] / tok, "train_tokens": trained_tokens}
        if cfg.tis_cap > 0:
            out["tis_weight_mean"] = tot["tis_weight_sum"] / tok
        if cfg.band:
            out["mask_frac"] = tot["masked"] / tok
        if self.ref is not None:
            out["kl_ref"] = tot["kl_ref_sum"] / tok
        if mm["n"] > 0:
            out.update(mismatch_from_sums(mm))
        return out

    def _update(self) -> float:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.env.distributed:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                D.all_reduce_sum(self.env, p.grad)
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:  # no sample with a valid reward this step
            gn = 0.0
        elif self.cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(with_grad, self.cfg.grad_clip)
        else:
            gn = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in with_grad]))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        check_in_place(self.policy, self.pointers)
        return float(gn)

    # ------------------------------------------------------------------ one step
    def run_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]
        batch, rewards, valid, scores, errors, t_reward = self.collect(self.step)
        adv = group_advantages(rewards, valid, scale=cfg.advantage == "grpo")
        t1 = time.perf_counter()
        st = self.train_on(batch, adv, valid)
        t_train = time.perf_counter() - t1
        self.step += 1
        dt = time.perf_counter() - t0
        self.elapsed += dt
        n_valid = float(valid.sum())
        r_sum, r_sq, n_v, n_err, len_sum, n_samp, trunc, n_roll_tok = self._global(
            float(rewards[valid].sum()), float((rewards[valid] ** 2).sum()), n_valid, len(errors),
            float(batch.num_tokens), len(batch.completion_ids),
            sum(r == "length" for r in batch.finish_reasons), float(batch.num_tokens))
        mean = r_sum / max(n_v, 1)
        rec = {"step": self.step, "reward_mean": mean,
               "reward_std": math.sqrt(max(r_sq / max(n_v, 1) - mean * mean, 0.0)), "reward_errors": int(n_err),
               "response_len": len_sum / max(n_samp, 1), "truncated_frac": trunc / max(n_samp, 1), "lr": lr,
               "rollout_tok_s": n_roll_tok / max(batch.seconds, 1e-9),
               "train_tok_s": st.pop("train_tokens") * self.env.world / max(t_train, 1e-9),
               "time_rollout_s": batch.seconds, "time_engine_memory_s": batch.memory_seconds,
               "time_reward_s": t_reward, "time_train_s": t_train,
               "elapsed_s": round(self.elapsed, 3), **st}
        for key in sorted({k for s in scores for k in s.info}):
            tot, n = self._global(sum(s.info[key] for s in scores if key in s.info),
                                  sum(key in s.info for s in scores))
            rec[f"task/{key}"] = tot / max(n, 1)
        if errors:
            log.warning("step %d: %d malformed reward(s), left out of the update; first: %s", self.step,
                        len(errors), errors[0])
        return rec

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str | None:
        env = self.env
        rngs = D.gather_objects(env, rng_state())
        path = None
        if env.is_main:
            state = {"kind": STATE_KIND, "step": self.step, "optimizer": self.opt.state_dict(),
                     "scheduler": self.sched.state_dict(), "rng": rngs, "config": self.cfg.to_dict(),
                     "elapsed_s": self.elapsed, "world_size": env.world}
            path = save_checkpoint(f"{self.cfg.out}/checkpoints", self.step, self.policy, self.cfg.model, state,
                                   self.cfg.keep_last)
        D.barrier(env)
        return path

    def close(self) -> None:
        self.task.close()
        D.teardown(self.env)


