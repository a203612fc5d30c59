"""Exact resume (bitwise on CPU, rollouts included) and the command line's one-line errors."""
import json
import os

import pytest
import torch

from ringlinear.cli import main
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.rl import RLConfig, train
from ringlinear.train.checkpoint import list_checkpoints

TIMING = {"elapsed_s", "rollout_tok_s", "train_tok_s", "time_rollout_s", "time_reward_s", "time_train_s",
          "time_engine_memory_s"}


def _metrics(out):
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in open(os.path.join(out, "metrics.jsonl"))]


def test_resume_is_bitwise(tiny_dir, tmp_path, parity_reward, prompts_file):
    spec = parity_reward
    data = prompts_file([{"prompt": f"Numbers {i} and punctuation"} for i in range(5)])
    base = RLConfig(model=tiny_dir, task="jsonl", data=data, reward=spec, steps=4, prompts_per_step=2, group_size=4,
                    max_new_tokens=8, lr=3e-3, progress=False, plot=False, save_every=1, keep_last=2, kl_coef=0.01,
                    warmup_steps=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(base.replace(out=a))
    train(base.replace(out=b, steps=2))
    assert [s for s, _ in list_checkpoints(os.path.join(b, "checkpoints"))] == [1, 2]
    train(base.replace(out=b, resume="auto"))
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    assert ma == mb  # every logged figure of steps 3 and 4 (rewards, lengths, loss, grad norm, mismatch) bitwise
    wa = RingLinearForCausalLM.from_pretrained(os.path.join(a, "final")).state_dict()
    wb = RingLinearForCausalLM.from_pretrained(os.path.join(b, "final")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_second_run_into_the_same_out_is_refused(tiny_dir, tmp_path):
    c = RLConfig(model=tiny_dir, task="arithmetic", out=str(tmp_path / "o"), steps=1, prompts_per_step=1,
                 group_size=2, max_new_tokens=2, progress=False, plot=False)
    train(c)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        train(c)


def _err(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_bad_flags_are_one_line(tiny_dir, tmp_path, capsys):
    m = ["rl", "--model", tiny_dir, "--out", str(tmp_path / "o")]
    assert "no config.json" in _err(capsys, ["rl", "--model", str(tmp_path), "--task", "code"])
    assert "--model is required" in _err(capsys, ["rl", "--task", "code"])
    assert "needs --data" in _err(capsys, m + ["--task", "jsonl"])
    assert "--tis-cap needs --old-logprobs recompute" in _err(capsys, m + ["--task", "code", "--tis-cap", "2"])
    assert "--mask-band" in _err(capsys, m + ["--task", "code", "--mask-band", "0.5,0.9"])
    assert "--temperature must be > 0" in _err(capsys, m + ["--task", "code", "--temperature", "0"])
    assert "--group-size must be >= 1" in _err(capsys, m + ["--task", "code", "--group-size", "0"])
    assert "belong to --task jsonl" in _err(capsys, m + ["--task", "arithmetic", "--reward", "a:b"])
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "x"}\n')
    assert "cannot import" in _err(capsys, m + ["--task", "jsonl", "--data", str(data), "--reward", "nope_xyz:f"])
    assert "--resume auto: no checkpoint" in _err(capsys, m + ["--task", "code", "--resume", "auto"])
    with pytest.raises(SystemExit):  # argparse: a choice that does not exist
        main(m + ["--task", "code", "--numerics", "fast"])
    assert "invalid choice" in capsys.readouterr().err


def test_print_config_and_help(tiny_dir, capsys):
    assert main(["rl", "--model", tiny_dir, "--task", "arithmetic", "--group-size", "4", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["group_size"] == 4 and cfg["numerics"] == "default" and cfg["old_logprobs"] == "rollout"
    with pytest.raises(SystemExit):
        main(["rl", "--help"])
    out = capsys.readouterr().out
    for flag in ("--numerics", "--old-logprobs", "--loss-agg", "--tis-cap", "--mask-band", "--kl-coef", "--clip-eps",
                 "--prompts-per-step", "--group-size", "--temperature", "--top-p", "--max-new-tokens", "--reward",
                 "--data", "--resume", "--no-progress", "torchrun"):
        assert flag in out, flag
