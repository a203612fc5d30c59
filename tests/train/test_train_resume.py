"""Exact resume, and what happens with corrupt, missing or half-written checkpoints."""
import hashlib
import json
import os

import pytest
import torch

from ringlinear.train import train
from ringlinear.train.checkpoint import MANIFEST, STATE, TrainCheckpointError, list_checkpoints
from ringlinear.train.report import read_metrics


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r}


def _tree_hashes(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """A: 8 steps straight through. B: the same run stopped after step 4, then resumed to step 8."""
    from ringlinear.train.config import get_train_preset
    base = get_train_preset("tiny-test").replace(data=[corpus], progress=False, plot=False, steps=8, save_every=2,
                                                 keep_last=3, eval_every=4, seq_aux_loss_coef=1e-3)
    a = str(tmp_path_factory.mktemp("a"))
    b = str(tmp_path_factory.mktemp("b"))
    train(base.replace(out=a))
    train(base.replace(out=b, stop_at=4))
    stopped = {"metrics": _losses(b), "ckpts": [s for s, _ in list_checkpoints(os.path.join(b, "checkpoints"))]}
    train(base.replace(out=b, resume="auto"))
    return a, b, stopped


def test_resume_is_bitwise_identical(runs):
    a, b, stopped = runs
    assert stopped["ckpts"] == [2, 4]
    assert sorted(stopped["metrics"]) == [1, 2, 3, 4]
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    # Steps 5..8 of the resumed run equal the uninterrupted run bit for bit (not just closely).
    for s in range(1, 9):
        assert la[s] == lb[s], (s, la[s], lb[s])
    from safetensors.torch import load_file
    wa = load_file(os.path.join(a, "final", "model.safetensors"))
    wb = load_file(os.path.join(b, "final", "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # includes mlp.gate.expert_bias (aux-loss-free balancing state)
    assert any(wa[k].abs().max() > 0 for k in wa if k.endswith("expert_bias"))
    # metrics.jsonl describes one consistent run: every step once, validation at 0, 4, 8
    recs = read_metrics(os.path.join(b, "metrics.jsonl"))
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 4, 8]


def test_checkpoint_is_a_loadable_model_dir(runs):
    a, _, _ = runs
    cks = list_checkpoints(os.path.join(a, "checkpoints"))
    assert [s for s, _ in cks] == [4, 6, 8]  # keep_last=3
    path = cks[-1][1]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", STATE, MANIFEST):
        assert os.path.exists(os.path.join(path, name)), name
    from ringlinear.models.modeling import RingLinearForCausalLM
    from ringlinear.models.tokenizer import load_tokenizer
    m = RingLinearForCausalLM.from_pretrained(path)
    tok = load_tokenizer(path)
    assert tok.stop_token_ids == [1, 2] and m.config.vocab_size >= tok.vocab_size
    assert not [n for n in os.listdir(os.path.join(a, "checkpoints")) if n.startswith(".tmp")]
    mask = os.umask(0)
    os.umask(mask)
    for d in (path, os.path.join(a, "final")):  # modes follow the umask (mkdtemp alone makes 0700 and 0600)
        assert os.stat(d).st_mode & 0o777 == 0o777 & ~mask
        assert all(os.stat(os.path.join(d, f)).st_mode & 0o777 == 0o666 & ~mask for f in os.listdir(d))


def _stopped_run(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path / "run", steps=6, save_every=2, keep_last=3, eval_every=0)
    train(cfg.replace(stop_at=4))
    return cfg, os.path.join(cfg.out, "checkpoints")


def test_corrupt_checkpoint_clear_error_previous_untouched(tmp_path, tiny_cfg):
    cfg, root = _stopped_run(tmp_path, tiny_cfg)
    (_, good), (_, latest) = list_checkpoints(root)
    with open(os.path.join(latest, "model.safetensors"), "r+b") as f:  # flip bytes in the middle of the weights
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x00\xff\x00\xff")
    before = _tree_hashes(cfg.out)
    with pytest.raises(TrainCheckpointError) as e:
        train(cfg.replace(resume="auto"))
    msg = str(e.value)
    assert "model.safetensors is corrupt" in msg and f"--resume {good}" in msg and "Nothing was changed" in msg
    assert _tree_hashes(cfg.out) == before  # nothing written, deleted or rotated
    # ...and the suggested checkpoint really resumes
    s = train(cfg.replace(resume=good))
    assert s["step"] == 6


@pytest.mark.parametrize("damage", ["missing_state", "missing_manifest", "truncated"])
def test_missing_or_truncated_files(tmp_path, tiny_cfg, damage):
    cfg, root = _stopped_run(tmp_path, tiny_cfg)
    (_, good), (_, latest) = list_checkpoints(root)
    if damage == "missing_state":
        os.remove(os.path.join(latest, STATE))
        expect = f"{STATE} is missing"
    elif damage == "missing_manifest":
        os.remove(os.path.join(latest, MANIFEST))
        expect = "interrupted save"
    else:
        p = os.path.join(latest, "model.safetensors")
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 100)
        expect = "truncated"
    before = _tree_hashes(good)
    with pytest.raises(TrainCheckpointError, match=expect):
        train(cfg.replace(resume="auto"))
    assert _tree_hashes(good) == before


def test_retention_after_resuming_from_an_older_checkpoint(tmp_path, tiny_cfg):
    # The case scaled down: step-6 is corrupt, the user resumes from step-4 and stops at 5 (keep_last 2).
    cfg = tiny_cfg(tmp_path / "run", steps=8, save_every=2, keep_last=2, eval_every=0)
    train(cfg.replace(stop_at=6))
    root = os.path.join(cfg.out, "checkpoints")
    (_, good), (_, bad) = list_checkpoints(root)
    with open(os.path.join(bad, "model.safetensors"), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x00\xff\x00\xff")
    bad_hashes = _tree_hashes(bad)
    train(cfg.replace(resume=good, stop_at=5))
    # The newest good checkpoint (5) and the one before it (4) are kept; the later step-6 is left as it was.
    assert [s for s, _ in list_checkpoints(root)] == [4, 5, 6]
    assert _tree_hashes(bad) == bad_hashes
    with pytest.raises(TrainCheckpointError, match="step-0000006: model.safetensors is corrupt") as e:
        train(cfg.replace(resume="auto"))
    assert "--resume " + os.path.join(root, "step-0000005") in str(e.value)


def test_no_checkpoint_and_bad_path(tmp_path, tiny_cfg):
    with pytest.raises(TrainCheckpointError, match="no checkpoint under"):
        train(tiny_cfg(tmp_path / "empty", resume="auto"))
    with pytest.raises(TrainCheckpointError, match="no such checkpoint directory"):
        train(tiny_cfg(tmp_path / "x", resume=str(tmp_path / "nope")))


def test_interrupted_save_leaves_previous_checkpoints(tmp_path, tiny_cfg, monkeypatch):
    cfg, root = _stopped_run(tmp_path, tiny_cfg)
    before = _tree_hashes(root)
    import ringlinear.train.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(ck.torch, "save", boom)  # dies after the weights were staged, before the manifest
    with pytest.raises(OSError, match="simulated"):
        train(cfg.replace(resume="auto"))
    monkeypatch.undo()
    assert _tree_hashes(root) == before  # step-4 and step-2 intact, no step-6, no leftover temp dir
    assert [s for s, _ in list_checkpoints(root)] == [2, 4]
    s = train(cfg.replace(resume="auto"))
    assert s["step"] == 6


def test_resume_refuses_a_different_run(tmp_path, tiny_cfg):
    cfg, _ = _stopped_run(tmp_path, tiny_cfg)
    with pytest.raises(ValueError, match="--seq-len"):
        train(cfg.replace(resume="auto", seq_len=32))
    with pytest.raises(ValueError, match="rows per step"):
        train(cfg.replace(resume="auto", batch_size=2))
    with open(os.path.join(cfg.out, "checkpoints", "step-0000004", MANIFEST)) as f:
        assert json.load(f)["config"]["seq_len"] == cfg.seq_len
