"""`ringlinear train` / `ringlinear convert` from the command line: flags, presets, resume, errors."""
import json
import os

import pytest

from ringlinear.cli import build_parser, main


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--seq-len", "--grad-accum", "--schedule", "{cosine,wsd,constant}", "--resume", "--stop-at",
                 "--bias-update-rate", "--seq-aux-loss-coef", "--grad-checkpointing", "--no-progress", "--fsdp",
                 "--init-from", "--data", "tiny-code", "torchrun --nproc-per-node"):
        assert flag in out, flag
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "--layer-group-size" in capsys.readouterr().out


def test_preset_then_flags(capsys):
    assert main(["train", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "tiny-code" and cfg["data"] == [] and cfg["model_preset"] == "tiny-code"
    assert main(["train", "--preset", "tiny-test", "--lr", "1e-3", "--no-plot", "--data", "a.txt", "b/",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["seq_len"], cfg["lr"], cfg["plot"], cfg["data"]) == (64, 1e-3, False, ["a.txt", "b/"])
    args = build_parser().parse_args(["train", "--steps", "5"])
    assert vars(args)["steps"] == 5 and "lr" not in vars(args)  # only given flags override the preset


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "no such file" in err and "Traceback" not in err
    assert main(["train", "--steps", "0", "--print-config"]) == 1
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["train", "--preset", "nope", "--print-config"]) == 1


def test_train_stop_resume_from_the_command_line(tmp_path, corpus, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--preset", "tiny-test", "--data", corpus, "--out", out, "--no-progress", "--steps", "6",
            "--save-every", "2", "--eval-every", "0"]
    assert main(base + ["--stop-at", "2"]) == 0
    text = capsys.readouterr().out
    assert "trained" in text and "stopped at step 2 of 6" in text and "--resume auto" in text
    # resuming needs only --out and --resume: the rest comes from the checkpoint
    assert main(["train", "--out", out, "--resume", "auto", "--no-progress"]) == 0
    assert "(6/6)" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["step"] == 6
    assert main(["train", "--out", out, "--resume", "auto", "--seq-len", "32"]) == 1
    assert "--seq-len cannot change" in capsys.readouterr().err
    # a new run into the same --out must say what it would do to the old checkpoints
    assert main(base) == 1
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert main(base + ["--overwrite", "--steps", "2"]) == 0
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-0000002"]


def test_convert_command(tmp_path, capsys):
    from ringlinear.testing import make_tiny_checkpoint
    src = make_tiny_checkpoint(str(tmp_path / "sm"), layer_group_size=1)
    assert main(["convert", "--from-softmax", src, "--layer-group-size", "3", "--out", str(tmp_path / "hy")]) == 0
    assert "2 linear + 3 softmax" in capsys.readouterr().out
    assert main(["convert", "--from-softmax", str(tmp_path / "hy"), "--layer-group-size", "3", "--out",
                 str(tmp_path / "x")]) == 1
    assert "already a hybrid" in capsys.readouterr().err


def test_busy_cpu_warning(monkeypatch, caplog):
    import logging

    import torch

    from ringlinear.train import trainer
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, warned in ((7.0, True), (0.3, False)):
        caplog.clear()
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        with caplog.at_level(logging.WARNING, logger="ringlinear.train"):
            trainer._warn_if_cpu_busy()
        assert any("--threads 1" in r.getMessage() for r in caplog.records) == warned
