"""`ringlinear rl` end to end on the tiny random model: a GRPO step, aligned numerics, every objective option."""
import json
import math
import os

import pytest
import torch

from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.rl import MISMATCH_KEYS, RLConfig, mismatch_metrics, sequence_logprobs, train
from ringlinear.rl.rollout import check_in_place, param_pointers
from ringlinear.rl.trainer import RLTrainer


@pytest.fixture
def cfg(tiny_dir, tmp_path, parity_reward, prompts_file):
    spec = parity_reward
    data = prompts_file([{"prompt": f"Hello {i} who are you"} for i in range(6)])

    def make(**kw):
        base = dict(model=tiny_dir, task="jsonl", data=data, reward=spec, out=str(tmp_path / "out"), steps=1,
                    prompts_per_step=2, group_size=4, max_new_tokens=6, lr=1e-3, progress=False, plot=False,
                    save_every=0, max_num_seqs=8)
        base.update(kw)
        return RLConfig(**base)
    return make


def _params(path):
    return {k: v.clone() for k, v in RingLinearForCausalLM.from_pretrained(path).state_dict().items()}


def test_one_grpo_step_end_to_end(cfg, tiny_dir):
    c = cfg(plot=True)
    summary = train(c)
    recs = [json.loads(ln) for ln in open(os.path.join(c.out, "metrics.jsonl"))]
    assert len(recs) == 1
    r = recs[0]
    for k in ("reward_mean", "reward_std", "response_len", *MISMATCH_KEYS, "clip_frac", "entropy", "grad_norm",
              "rollout_tok_s", "train_tok_s", "loss", "time_rollout_s", "time_train_s"):
        assert k in r and math.isfinite(r[k]), k
    assert 0 < r["reward_std"] and r["grad_norm"] > 0  # some signal, so an update happened
    before, after = _params(tiny_dir), _params(os.path.join(c.out, "final"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and "lm_head.weight" in changed
    assert os.path.exists(os.path.join(c.out, "reward.png")) and os.path.exists(os.path.join(c.out, "mismatch.png"))
    assert summary["step"] == 1 and os.path.isdir(os.path.join(c.out, "checkpoints", "step-0000001"))


def test_optimizer_updates_in_place(cfg):
    tr = RLTrainer(cfg())
    try:
        ptrs = param_pointers(tr.policy)
        tr.run_step()
        check_in_place(tr.policy, ptrs)  # every parameter, buffer and MoE stack where the engine's graphs saw it
        assert param_pointers(tr.policy) == ptrs
        w = next(tr.policy.parameters())
        w.data = w.data.clone()  # what an out-of-place optimizer would do
        with pytest.raises(RuntimeError, match="moved 1 tensor"):
            check_in_place(tr.policy, ptrs)
    finally:
        tr.close()


def test_every_objective_option_runs(cfg):
    c = cfg(old_logprobs="recompute", tis_cap=2.0, mask_band="0.5,2", kl_coef=0.05, loss_agg="sequence",
            mini_batches=2, micro_batch_tokens=32, advantage="mean", steps=2)
    tr = RLTrainer(c)
    try:
        recs = [tr.run_step(), tr.run_step()]
    finally:
        tr.close()
    for r in recs:
        for k in ("tis_weight_mean", "mask_frac", "kl_ref", *MISMATCH_KEYS):
            assert math.isfinite(r[k]), k
    assert recs[1]["kl_ref"] > 0


def test_kl_to_the_reference_starts_at_exactly_zero(cfg):
    tr = RLTrainer(cfg(kl_coef=0.1, steps=2))
    try:
        first, second = tr.run_step(), tr.run_step()
    finally:
        tr.close()
    # one update per step: the first step's forward is the reference's computation on the same weights, bit for bit
    assert first["kl_ref"] == 0.0 and second["kl_ref"] > 0


def test_mismatch_figures_are_those_of_engine_vs_training_forward(cfg):
    """Default numerics: the logged figures equal an independent recomputation (engine log-probs vs
    sequence_logprobs at theta_old); on CPU fp32 they are tiny but not zero (recurrent decode vs chunked)."""
    tr = RLTrainer(cfg())
    try:
        batch, *_ = tr.collect(0)
        with torch.no_grad():
            train_lp = sequence_logprobs(tr.policy, batch.prompt_ids, batch.completion_ids)
    finally:
        tr.close()
    m = mismatch_metrics(batch.logprobs, train_lp)
    tr2 = RLTrainer(cfg(out=cfg().out + "2"))
    try:
        rec = tr2.run_step()
    finally:
        tr2.close()
    assert {k: rec[k] for k in MISMATCH_KEYS} == m
    print("default numerics, CPU fp32:", m)
    assert m["max_abs_dlogp"] < 1e-4 and m["frac_dp_gt_0.8"] == 0.0


def test_aligned_first_step_ratio_is_exactly_one(cfg):
    tr = RLTrainer(cfg(numerics="aligned", temperature=1.0))
    try:
        rec = tr.run_step()
    finally:
        tr.close()
    assert rec["ratio_max"] == 1.0 and rec["ratio_min"] == 1.0 and rec["clip_frac"] == 0.0
    assert {k: rec[k] for k in MISMATCH_KEYS} == {k: 0.0 for k in MISMATCH_KEYS}


def test_aligned_engine_logprobs_equal_sequence_logprobs_bitwise(cfg):
    tr = RLTrainer(cfg(numerics="aligned", prompts_per_step=4, max_new_tokens=24))
    try:
        batch, *_ = tr.collect(0)
        with torch.no_grad():
            train_lp = sequence_logprobs(tr.policy, batch.prompt_ids, batch.completion_ids, numerics="aligned")
        forked = tr.rollout.engine.stats()["forked_requests"]
    finally:
        tr.close()
    assert forked > 0  # samples forked from their group's prefill (those without a free slot queued): bitwise too
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(batch.logprobs, train_lp))


def test_malformed_rewards_are_counted_and_the_step_goes_on(cfg, reward_module, caplog):
    spec = reward_module("import math\n"
                         "def reward(prompt, completion, record):\n"
                         "    n = len(completion)\n"
                         "    if n % 3 == 0:\n        raise RuntimeError('bad sample')\n"
                         "    return math.nan if n % 3 == 1 else 1.0\n")
    tr = RLTrainer(cfg(reward=spec, steps=1))
    try:
        with caplog.at_level("WARNING", logger="ringlinear.rl"):
            rec = tr.run_step()
    finally:
        tr.close()
    assert rec["reward_errors"] > 0 and math.isfinite(rec["loss"])
    assert "malformed reward" in caplog.text and ("bad sample" in caplog.text or "returned nan" in caplog.text)


def test_a_step_where_every_reward_is_malformed(cfg, reward_module):
    tr = RLTrainer(cfg(reward=reward_module("def reward(prompt, completion, record):\n    return 'x'\n")))
    try:
        before = {n: p.detach().clone() for n, p in tr.policy.named_parameters()}
        rec = tr.run_step()
    finally:
        tr.close()
    assert rec["reward_errors"] == 8 and rec["loss"] == 0.0 and rec["grad_norm"] == 0.0
    assert all(torch.equal(before[n], p) for n, p in tr.policy.named_parameters())  # nothing to learn from
