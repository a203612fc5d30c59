"""`--async-save`: the same checkpoints as a synchronous save, written while the next steps run; exact resume from
them; a failed background write surfaces as a one-line error and leaves the earlier checkpoints intact."""
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from ringlinear.train import train
from ringlinear.train import trainer as T
from ringlinear.train.checkpoint import STATE, list_checkpoints, verify_checkpoint
from ringlinear.train.report import read_metrics


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r}


def _cfg(tiny_cfg, out, **kw):
    return tiny_cfg(out, **{"steps": 6, "save_every": 2, "keep_last": 2, "eval_every": 0, "device": "cpu", **kw})


def test_async_checkpoints_equal_sync_ones_and_resume_exactly(tmp_path, tiny_cfg):
    sync = train(_cfg(tiny_cfg, tmp_path / "sync"))
    asy = train(_cfg(tiny_cfg, tmp_path / "async", async_save=True))
    assert sync["loss_end"] == asy["loss_end"]
    cs, ca = (list_checkpoints(str(tmp_path / d / "checkpoints")) for d in ("sync", "async"))
    assert [s for s, _ in cs] == [s for s, _ in ca] == [4, 6]  # retention ran after each background write
    for (_, ps), (_, pa) in zip(cs, ca):
        verify_checkpoint(pa)  # manifest, sizes, sha256
        ws, wa = load_file(os.path.join(ps, "model.safetensors")), load_file(os.path.join(pa, "model.safetensors"))
        assert ws.keys() == wa.keys() and all(torch.equal(ws[k], wa[k]) for k in ws)
        ss, sa = (torch.load(os.path.join(p, STATE), weights_only=False) for p in (ps, pa))
        for k, v in ss["optimizer"]["state"].items():
            for name, t in v.items():
                assert torch.equal(t, sa["optimizer"]["state"][k][name]), (k, name)
    # stopped at 4 with async saves, resumed: the uninterrupted run's losses bit for bit
    out = tmp_path / "resumed"
    train(_cfg(tiny_cfg, out, async_save=True, stop_at=4))
    train(_cfg(tiny_cfg, out, async_save=True, resume="auto"))
    assert _losses(str(out)) == _losses(str(tmp_path / "sync"))


def test_training_runs_on_while_a_checkpoint_is_written(tmp_path, tiny_cfg, monkeypatch):
    """The write of step 2 blocks until step 3's forward has started: a synchronous save would deadlock here
    (it is given 60 s, then the test fails)."""
    next_step = threading.Event()
    seen = {}
    real_save, real_fb = T.save_checkpoint, T.Trainer.forward_backward

    def slow_save(root, step, *a):
        if step == 2:
            seen["overlapped"] = next_step.wait(60)
        return real_save(root, step, *a)

    def fb(self, step):
        if step >= 2:
            next_step.set()
        return real_fb(self, step)

    monkeypatch.setattr(T, "save_checkpoint", slow_save)
    monkeypatch.setattr(T.Trainer, "forward_backward", fb)
    train(_cfg(tiny_cfg, tmp_path / "r", async_save=True, steps=4, keep_last=3))
    assert seen == {"overlapped": True}
    assert [s for s, _ in list_checkpoints(str(tmp_path / "r" / "checkpoints"))] == [2, 4]


def test_a_failed_background_write_is_an_error_and_keeps_earlier_checkpoints(tmp_path, tiny_cfg, monkeypatch):
    real_save = T.save_checkpoint

    def failing(root, step, *a):
        if step == 4:
            raise OSError(28, "No space left on device")
        return real_save(root, step, *a)

    monkeypatch.setattr(T, "save_checkpoint", failing)
    with pytest.raises(RuntimeError, match=r"asynchronous save of .*step-0000004 failed: OSError.*No space left"):
        train(_cfg(tiny_cfg, tmp_path / "f", async_save=True))
    ck = list_checkpoints(str(tmp_path / "f" / "checkpoints"))
    assert [s for s, _ in ck] == [2]
    verify_checkpoint(ck[0][1])
