"""`ringlinear train --fsdp --ep N` on gloo processes equals one process on the combined batch: the first step's
loss and every gradient, a short training loop, exact resume at the same world size, and resume at world 2 from a
world-4 checkpoint and back (the checkpoint holds the full model and optimizer state by name: resharded on load)."""
import os

import pytest
import torch

from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.testing import spawn_gloo
from ringlinear.train.config import TrainConfig, get_train_preset
from ringlinear.train.report import read_metrics
from ringlinear.train.step import to_host
from ringlinear.train.trainer import Trainer

STEPS = 3


def _first_step(tr) -> dict:
    """Step 0's loss and full gradients (DTensor shards gathered: collective, every rank in the same order)."""
    st = to_host(tr.forward_backward(0))
    grads = {}
    for p, name in tr.model._sharded_names.items() if tr.fsdp else ():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    if not tr.fsdp:
        grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    tr.opt.zero_grad(set_to_none=True)
    return {"loss": st["loss_sum"] / st["targets"], "grads": grads}


def _losses(out):
    return {m["step"]: m["loss"] for m in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in m}


def _world2(rank, world, cfg_dict, tmp, resume_from=None):
    """World 2, ep 2: first step; straight run; stopped at 2 and resumed (or, with resume_from, a run resumed from
    another world's checkpoint)."""
    cfg = TrainConfig.from_dict(cfg_dict)
    if resume_from is not None:
        Trainer(cfg.replace(out=f"{tmp}/w2-from-w4", resume=resume_from)).train()
        return None
    first = _first_step(Trainer(cfg.replace(out=f"{tmp}/w2-first")))
    Trainer(cfg.replace(out=f"{tmp}/w2-a")).train()
    Trainer(cfg.replace(out=f"{tmp}/w2-b", stop_at=2)).train()
    Trainer(cfg.replace(out=f"{tmp}/w2-b", resume="auto")).train()
    return first


def _world4(rank, world, cfg_dict, tmp):
    """World 4 = dp 2 x ep 2 (with activation checkpointing: the all-to-alls are recomputed in backward): first
    step; straight run; stopped at 2; and a run resumed from world 2's step-2 checkpoint."""
    cfg = TrainConfig.from_dict(cfg_dict)
    first = _first_step(Trainer(cfg.replace(out=f"{tmp}/w4-first")))
    Trainer(cfg.replace(out=f"{tmp}/w4-a")).train()
    Trainer(cfg.replace(out=f"{tmp}/w4-b", stop_at=2)).train()
    Trainer(cfg.replace(out=f"{tmp}/w4-from-w2", resume=f"{tmp}/w2-b/checkpoints/step-0000002")).train()
    return first


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    tmp = str(tmp_path_factory.mktemp("ep"))
    base = get_train_preset("tiny-test").replace(data=[corpus], progress=False, plot=False, steps=STEPS,
                                                 eval_every=0, save_every=1, keep_last=3, seq_aux_loss_coef=1e-2,
                                                 threads=1, device="cpu", data_cache=f"{tmp}/data")
    # one process, 8 rows per step (2 micro-batches of 4)
    one = base.replace(out=f"{tmp}/one-first", batch_size=4, grad_accum=2)
    single = _first_step(Trainer(one))
    Trainer(one.replace(out=f"{tmp}/one")).train()
    tok = f"{tmp}/one-first/tokenizer"
    par = base.replace(fsdp=True, ep=2, tokenizer=tok)
    w2 = par.replace(batch_size=4).to_dict()
    w4 = par.replace(batch_size=2, grad_checkpointing=True).to_dict()
    first2 = spawn_gloo(_world2, 2, w2, tmp)[0]
    first4 = spawn_gloo(_world4, 4, w4, tmp)[0]
    spawn_gloo(_world2, 2, w2, tmp, f"{tmp}/w4-b/checkpoints/step-0000002")
    return tmp, single, first2, first4


def _final(path):
    return dict(RingLinearForCausalLM.from_pretrained(os.path.join(path, "final")).named_parameters())


@pytest.mark.parametrize("world", [2, 4])
def test_first_step_loss_and_gradients_equal_one_process(runs, world):
    _, single, first2, first4 = runs
    got = first2 if world == 2 else first4
    assert got["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert got["grads"].keys() == single["grads"].keys()
    assert any(n.endswith("mlp.w13") for n in got["grads"])
    for n, g in single["grads"].items():
        # fp32 rounding of other summation orders (FSDP's reduce-scatter, the DP sum of expert gradients)
        err = float((got["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        assert err < 1e-5, (n, err)


def test_training_and_resume_match_one_process(runs):
    tmp, *_ = runs
    one = _final(f"{tmp}/one")
    for run in ("w2-a", "w4-a", "w2-from-w4", "w4-from-w2"):
        final = _final(f"{tmp}/{run}")
        for n, p in one.items():
            torch.testing.assert_close(final[n], p, rtol=0, atol=2e-5, msg=f"{run}: {n}")
        assert _losses(f"{tmp}/{run}")[STEPS] == pytest.approx(_losses(f"{tmp}/one")[STEPS], rel=1e-4), run
    # the same world size resumes exactly: every step's loss and every weight bit for bit
    assert _losses(f"{tmp}/w2-a") == _losses(f"{tmp}/w2-b") and sorted(_losses(f"{tmp}/w2-a")) == [1, 2, 3]
    a, b = _final(f"{tmp}/w2-a"), _final(f"{tmp}/w2-b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def _bf16_resume(rank, world, cfg_dict, tmp):
    cfg = TrainConfig.from_dict(cfg_dict)
    Trainer(cfg.replace(out=f"{tmp}/bf16-a")).train()
    Trainer(cfg.replace(out=f"{tmp}/bf16-b", stop_at=2)).train()
    Trainer(cfg.replace(out=f"{tmp}/bf16-b", resume="auto")).train()


def test_bf16_master_adamw_resumes_exactly(runs, tmp_path, corpus):
    """The GPU configuration's optimizer (bf16 parameters, fp32 master weights and moments kept per local shard,
    gathered and resharded by name): a stopped and resumed run equals the straight one bit for bit."""
    tmp, *_ = runs
    cfg = get_train_preset("tiny-test").replace(
        data=[corpus], progress=False, plot=False, steps=STEPS, eval_every=0, save_every=1, threads=1,
        device="cpu", fsdp=True, ep=2, precision="bf16", batch_size=4, tokenizer=f"{tmp}/one-first/tokenizer")
    spawn_gloo(_bf16_resume, 2, cfg.to_dict(), str(tmp_path))
    la, lb = _losses(f"{tmp_path}/bf16-a"), _losses(f"{tmp_path}/bf16-b")
    assert la == lb and sorted(la) == [1, 2, 3]
    a, b = _final(f"{tmp_path}/bf16-a"), _final(f"{tmp_path}/bf16-b")
    assert all(torch.equal(a[n], b[n]) for n in a)
