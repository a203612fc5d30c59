"""--ep / --cp / --tp mistakes are one line naming the limit, before any data, model or rank work."""
import importlib.util
import os
import time

import pytest

from ringlinear.cli import main
from ringlinear.testing import make_tiny_checkpoint


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 1
    _, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_train_parallel_flags(tmp_path, capsys):
    out = str(tmp_path / "run")
    t = time.monotonic()
    _one_line_error(capsys, ["train", "--ep", "2", "--out", out], "--ep 2 needs --fsdp")
    _one_line_error(capsys, ["train", "--fsdp", "--ep", "2", "--out", out], "--ep 2 does not divide the 1 processes")
    _one_line_error(capsys, ["train", "--cp", "2", "--out", out], "--cp 2 does not divide the 1 processes")
    _one_line_error(capsys, ["train", "--fsdp", "--ep", "2", "--cp", "2", "--out", out], "--ep and --cp together")
    _one_line_error(capsys, ["train", "--cp", "2", "--seq-aux-loss-coef", "0.01", "--out", out],
                    "--seq-aux-loss-coef", "--cp")
    _one_line_error(capsys, ["train", "--cp", "3", "--seq-len", "64", "--batch-size", "4", "--out", out],
                    "--cp 3 must divide the tokens of a micro-batch")
    _one_line_error(capsys, ["train", "--ep", "0", "--out", out], "--ep must be >= 1")
    assert time.monotonic() - t < 10 and not os.path.exists(out)  # no BPE, no directory


def test_serve_tp_refused_before_the_port_and_ranks(tmp_path, capsys):
    if importlib.util.find_spec("uvicorn") is None:
        pytest.skip("ringlinear serve needs the serving extras (fastapi, uvicorn)")
    ckpt = make_tiny_checkpoint(str(tmp_path / "tiny"))
    _one_line_error(capsys, ["serve", "--model", ckpt, "--tp", "4"], "--tp 4", "group_norm_size 2",
                    "valid --tp: 1, 2")
    _one_line_error(capsys, ["serve", "--model", ckpt, "--tp", "3"], "--tp 3")
    _one_line_error(capsys, ["serve", "--model", ckpt, "--tp", "2", "--ep", "4"], "must be equal")
