"""A user's mistake on the command line is one line naming the flag, before any expensive work, never a traceback."""
import importlib.util
import logging
import os
import socket
import time

import pytest
import torch

from ringlinear.cli import main
from ringlinear.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("cli") / "tiny"))


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    return out, err


def test_generate_errors(ckpt, capsys):
    _one_line_error(capsys, ["generate", "--model", "/nonexistent", "--prompt", "x"], "/nonexistent does not exist")
    _one_line_error(capsys, ["generate", "--model", ckpt, "--prompt", "x", "--device", "tpu"], "'tpu'")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["generate", "--model", ckpt, "--prompt", "x", "--device", "cuda"],
                        "CUDA is not available")
    for flag, value, name in (("--temperature", "nan", "temperature"), ("--top-p", "0", "top_p"),
                              ("--seed", "-1", "seed"), ("--dtype", "int4", "dtype"), ("--min-p", "2", "min_p"),
                              ("--repetition-penalty", "0", "repetition_penalty"),
                              ("--presence-penalty", "9", "presence_penalty"),
                              ("--logit-bias", "5", "TOKEN_ID=BIAS"), ("--logit-bias", "x=1", "logit_bias"),
                              ("--logit-bias", "5=300", "logit_bias")):
        out, _ = _one_line_error(capsys, ["generate", "--model", ckpt, "--prompt", "echoed?", flag, value], name)
        assert out == ""  # refused before the prompt is echoed (and before the model loads)


def test_info_errors(capsys):
    _one_line_error(capsys, ["info", "--preset", "tiny", "--context", "-5"], "--context must be >= 1")
    _, err = _one_line_error(capsys, ["info", "--preset", "nope"], "unknown preset 'nope'")
    assert not err.startswith('error: "')  # a KeyError's repr used to quote the whole message


def test_train_errors_before_any_work(tmp_path, capsys):
    out = str(tmp_path / "run")
    t = time.monotonic()
    _one_line_error(capsys, ["train", "--model-preset", "nope", "--out", out], "--model-preset 'nope'")
    _one_line_error(capsys, ["train", "--warmup-steps", "1000", "--steps", "10", "--out", out], "--warmup-steps 1000")
    _one_line_error(capsys, ["train", "--model-config", str(tmp_path / "none.json"), "--out", out], "none.json")
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "file")], "is a file, not a directory")
    _one_line_error(capsys, ["train", "--device", "tpu", "--out", out], "'tpu'")
    assert time.monotonic() - t < 10  # no BPE was learnt on the way to these errors
    assert not os.path.exists(out)


def test_serve_errors_before_the_model_loads(ckpt, tmp_path, capsys, caplog):
    pytest.importorskip("uvicorn", reason="ringlinear serve needs the serving extras (fastapi, uvicorn)")
    _one_line_error(capsys, ["serve", "--model", ckpt, "--port", "99999"], "--port 99999")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.INFO):
            _one_line_error(capsys, ["serve", "--model", ckpt, "--port", str(port)], f"127.0.0.1:{port}",
                            "in use")
    assert not [r for r in caplog.records if "serving" in r.getMessage()]  # no banner before the bind error
    _one_line_error(capsys, ["serve", "--model", str(tmp_path / "nope")], "does not exist")
    _one_line_error(capsys, ["serve", "--model", ckpt, "--port", "0", "--state-snapshot-interval", "100"],
                    "state_snapshot_interval must be a positive multiple of 512")
    _one_line_error(capsys, ["serve", "--model", ckpt, "--chat-template", str(tmp_path / "none.jinja")],
                    "--chat-template", "no such file")
    for name, text, needle in (("syntax.jinja", "{% for m in messages %}{{ m['content'] }}", "line 1"),
                               ("raises.jinja", "{{ raise_exception('no system role') }}", "no system role"),
                               ("undefined.jinja", "{{ messages[0]['content'].nope() }}", "not a usable")):
        (tmp_path / name).write_text(text)
        with caplog.at_level(logging.INFO):
            _one_line_error(capsys, ["serve", "--model", ckpt, "--chat-template", str(tmp_path / name)],
                            f"--chat-template {tmp_path / name}", needle)
    assert not [r for r in caplog.records if "engine:" in r.getMessage()]  # refused before the model loaded


def test_a_training_run_directory_points_at_its_model(ckpt, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "final")
    serve = [["serve", "--model", str(run), "--port", "0"]] if importlib.util.find_spec("uvicorn") else []
    for argv in serve + [["generate", "--model", str(run), "--prompt", "x"]]:
        _one_line_error(capsys, argv, "(it is a training run; its model is " + str(run / "final") + ")")
