"""`ringlinear train --cp N` on gloo processes (a CP group splits every micro-batch; with DDP, and dp 2 x cp 2
under FSDP2) equals one process: first-step loss and gradients, a short loop, validation loss."""
import os

import pytest
import torch

from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.testing import spawn_gloo
from ringlinear.train.config import TrainConfig, get_train_preset
from ringlinear.train.trainer import Trainer

from test_train_expert_parallel import _first_step  # noqa: E402  (same helper: step-0 loss, full gradients)


def _worker(rank, world, cfg_dict, tmp, name):
    cfg = TrainConfig.from_dict(cfg_dict)
    first = _first_step(Trainer(cfg.replace(out=f"{tmp}/{name}-first")))
    summary = Trainer(cfg.replace(out=f"{tmp}/{name}")).train()
    return {"first": first, "summary": summary}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    tmp = str(tmp_path_factory.mktemp("cp"))
    base = get_train_preset("tiny-test").replace(data=[corpus], progress=False, plot=False, steps=3, eval_every=0,
                                                 save_every=0, threads=1, device="cpu", batch_size=4, grad_accum=2,
                                                 data_cache=f"{tmp}/data")
    one = base.replace(out=f"{tmp}/one-first")
    single = {"first": _first_step(Trainer(one)), "summary": Trainer(one.replace(out=f"{tmp}/one")).train()}
    tok = f"{tmp}/one-first/tokenizer"
    ddp = spawn_gloo(_worker, 2, base.replace(cp=2, tokenizer=tok).to_dict(), tmp, "cp2")[0]
    fsdp = spawn_gloo(_worker, 4, base.replace(cp=2, fsdp=True, grad_accum=1, tokenizer=tok).to_dict(), tmp,
                      "dp2cp2")[0]
    return tmp, single, {"cp2": ddp, "dp2cp2": fsdp}


@pytest.mark.parametrize("name", ["cp2", "dp2cp2"])
def test_cp_training_equals_one_process(runs, name):
    tmp, single, par = runs
    got, want = par[name]["first"], single["first"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["grads"].keys() == want["grads"].keys()
    for n, g in want["grads"].items():
        err = float((got["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        assert err < 1e-5, (n, err)  # fp32: the pieces chunk their sequences from their own starts
    s, s1 = par[name]["summary"], single["summary"]
    assert s["step"] == 3 and s["loss_end"] == pytest.approx(s1["loss_end"], rel=1e-4)
    assert s["val_loss_end"] == pytest.approx(s1["val_loss_end"], rel=1e-5)  # evaluation split the same way
    one = dict(RingLinearForCausalLM.from_pretrained(os.path.join(tmp, "one", "final")).named_parameters())
    final = dict(RingLinearForCausalLM.from_pretrained(os.path.join(tmp, name, "final")).named_parameters())
    for n, p in one.items():
        torch.testing.assert_close(final[n], p, rtol=0, atol=2e-5, msg=n)
