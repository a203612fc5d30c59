"""The mismatch figures on hand-computed examples."""
import math

import pytest
import torch

from ringlinear.rl import MISMATCH_KEYS, mismatch_metrics


def test_keys_are_the_align_check_names():
    assert MISMATCH_KEYS == ("max_abs_dlogp", "mean_abs_dlogp", "kl_rollout_train", "frac_dp_gt_0.8")


def test_identical_is_exactly_zero():
    lp = [torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.9]))]
    m = mismatch_metrics(lp, [t.clone() for t in lp])
    assert m == {k: 0.0 for k in MISMATCH_KEYS}


def test_hand_example():
    # token 1: q = 0.5, p = 0.25 (d = -ln 2); token 2: q = p = 0.1 (d = 0); token 3: q = 0.05, p = 0.9 (|dp| = 0.85)
    q = [[math.log(0.5), math.log(0.1)], [math.log(0.05)]]
    p = [[math.log(0.25), math.log(0.1)], [math.log(0.9)]]
    m = mismatch_metrics(q, p)
    assert m["max_abs_dlogp"] == pytest.approx(math.log(18), rel=1e-12)
    assert m["mean_abs_dlogp"] == pytest.approx((math.log(2) + math.log(18)) / 3, rel=1e-12)
    # k3: mean of (p/q - 1 - ln(p/q)) = ((0.5 - 1 + ln 2) + 0 + (18 - 1 - ln 18)) / 3
    assert m["kl_rollout_train"] == pytest.approx((0.5 - 1 + math.log(2) + 17 - math.log(18)) / 3, rel=1e-12)
    assert m["frac_dp_gt_0.8"] == pytest.approx(1 / 3)


def test_token_weighted_and_flat_tensors_agree():
    g = torch.Generator().manual_seed(0)
    q = torch.log_softmax(torch.randn(20, 7, generator=g), -1)[:, 0]
    p = q + 0.01 * torch.randn(20, generator=g)
    flat = mismatch_metrics(q, p)
    split = mismatch_metrics(list(q.split([3, 17])), list(p.split([3, 17])))
    assert flat == split
    assert flat["kl_rollout_train"] > 0


def test_shape_errors():
    with pytest.raises(ValueError, match="sequence 0"):
        mismatch_metrics([[0.0, 0.0]], [[0.0]])
    with pytest.raises(ValueError, match="no tokens"):
        mismatch_metrics(torch.zeros(0), torch.zeros(0))


def test_shards_combine_to_the_whole():
    from ringlinear.rl.metrics import mismatch_from_sums, mismatch_sums
    g = torch.Generator().manual_seed(1)
    q = torch.log_softmax(torch.randn(30, 5, generator=g), -1)[:, 0]
    p = torch.log_softmax(torch.randn(30, 5, generator=g), -1)[:, 0]
    a, b = mismatch_sums(q[:11], p[:11]), mismatch_sums(q[11:], p[11:])
    comb = {k: a[k] + b[k] for k in ("n", "abs_sum", "k3_sum", "dp_count")}
    comb["max_abs"] = max(a["max_abs"], b["max_abs"])
    whole = mismatch_metrics(q, p)
    assert mismatch_from_sums(comb) == pytest.approx(whole, rel=1e-12)
