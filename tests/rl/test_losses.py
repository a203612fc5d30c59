"""The objective's pieces on hand-checked values (no model)."""
import math

import pytest
import torch

from ringlinear.rl.losses import (band_mask, group_advantages, is_ratio, k3_kl, ppo_clip, rl_loss, tis_weight,
                                  token_weights)


def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(r, eps=0.0 + 1e-12)
    # group 0: mean 0.5, sample std (n-1) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert a[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert a[1].tolist() == [0.0] * 4  # no signal in a group of equal rewards
    assert group_advantages(r, scale=False)[0].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_group_advantages_leave_invalid_out():
    r = torch.tensor([[1.0, 0.0, 99.0]])
    v = torch.tensor([[True, True, False]])
    a = group_advantages(r, v, eps=0.0)
    s = math.sqrt(0.5)  # std of {1, 0} with n - 1
    assert a.tolist() == [[pytest.approx(0.5 / s), pytest.approx(-0.5 / s), 0.0]]
    assert group_advantages(torch.tensor([[1.0, 5.0]]), torch.tensor([[True, False]])).tolist() == [[0.0, 0.0]]


def test_ppo_clip_hand_values():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7])).requires_grad_()
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, -2.0, 3.0])
    pg, ratio, clipped = ppo_clip(logp, old, adv, clip_eps=0.2)
    # r=1.5, A=1: min(1.5, 1.2) = 1.2 (clipped); r=0.5, A=-1: min(-0.5, -0.8) = -0.8 (clipped)
    # r=1.1, A=-2: min(-2.2, -2.2) = -2.2; r=0.7, A=3: min(2.1, 2.4) = 2.1 (unclipped side)
    assert pg.tolist() == pytest.approx([-1.2, 0.8, 2.2, -2.1])
    assert ratio.tolist() == pytest.approx([1.5, 0.5, 1.1, 0.7])
    assert clipped.tolist() == [True, True, False, False]
    pg.sum().backward()
    # d(-r A)/d logp = -r A where unclipped, 0 where clipped
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 2.2, -2.1])


def test_is_ratio_tis_and_band():
    rho = is_ratio(torch.log(torch.tensor([0.1, 0.5, 0.9])), torch.log(torch.tensor([0.4, 0.5, 0.1])))
    assert rho.tolist() == pytest.approx([0.25, 1.0, 9.0])
    assert tis_weight(rho, 2.0).tolist() == pytest.approx([0.25, 1.0, 2.0])
    assert band_mask(rho, 0.5, 2.0).tolist() == [0.0, 1.0, 0.0]
    assert band_mask(rho, 0.2, 10.0).tolist() == [1.0, 1.0, 1.0]


def test_k3_hand_values_and_gradient():
    logp = torch.tensor([math.log(0.5), math.log(0.2)], requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.2)])
    kl = k3_kl(logp, ref)
    assert kl.tolist() == pytest.approx([0.5 - 1 + math.log(2), 0.0])
    kl.sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    assert logp.grad.tolist() == pytest.approx([0.5, 0.0])


def test_token_weights():
    assert token_weights([2, 3], "token").tolist() == pytest.approx([0.2] * 5)
    assert token_weights([2, 3], "sequence").tolist() == pytest.approx([0.25, 0.25, 1 / 6, 1 / 6, 1 / 6])
    # a micro-batch of a larger batch: the totals are the batch's
    assert token_weights([2], "token", total_tokens=8).tolist() == [0.125, 0.125]
    assert token_weights([2], "sequence", total_seqs=4).tolist() == [0.125, 0.125]
    with pytest.raises(ValueError, match="aggregation"):
        token_weights([1], "mean")


def test_rl_loss_combines_terms():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.8])).requires_grad_()
    rollout = torch.log(torch.tensor([0.5, 0.5, 0.1]))
    adv = torch.tensor([1.0, 1.0, -1.0])
    w = token_weights([3], "token")
    rho = is_ratio(logp, rollout)  # [1, 0.5, 8]
    ref = torch.log(torch.tensor([0.25, 0.25, 0.8]))
    loss, st = rl_loss(logp, rollout, adv, w, clip_eps=0.2, rho=rho, tis_cap=2.0, mask_band=(0.5, 2.0),
                       ref_logp=ref, kl_coef=0.1)
    # pg: r=[1, .5, 8]: [-1, -0.5, min(-8, -1.2) -> 8]; tis w=[1, .5, 2]; kl=[0.5-1+ln2, 0, 0]; mask [1, 1, 0]
    kl0 = 0.5 - 1 + math.log(2)
    expected = ((-1 * 1 + 0.1 * kl0) + (-0.5 * 0.5 + 0) + 0) / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert st["masked"] == 1 and st["clipped"] == 0 and st["tokens"] == 3
    loss.backward()
    assert torch.isfinite(logp.grad).all()
