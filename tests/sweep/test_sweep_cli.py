"""`ringlinear sweep` end to end: the --quick grid (grid -> runs -> fits -> plots -> report), skipping finished runs
on a second invocation, resuming an interrupted run exactly, and one-line errors for bad flags before any work."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ringlinear.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "quick"
    p = subprocess.run([sys.executable, "-m", "ringlinear", "sweep", "--quick", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_quick_sweep_end_to_end(quick):
    out, p = quick
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 8 and not res["missing"] and not res["failed"]
    assert {r["ratio"] for r in res["runs"]} == {"softmax", "3"} and {r["size"] for r in res["runs"]} == {"0.2M",
                                                                                                         "0.5M"}
    for size, by in res["param_matching"].items():
        assert by["_spread"] <= 0.02 and all(abs(v["deviation"]) <= 0.02 for k, v in by.items() if k != "_spread")
    for r in res["runs"]:
        spec = json.loads((out / "runs" / r["id"] / "run.json").read_text())
        assert r["steps"] == spec["steps"] and r["flops"] == spec["flops_per_token"]["total"] * r["tokens"]
        assert abs(r["flops"] / r["budget_flops"] - 1) <= 0.5 / r["steps"] + 1e-9  # steps rounded to the budget
        assert 0 < r["val_loss"] < 10 and (r["retrieval"] is not None) == (r["budget"] == "1.5e11")
        run_dir = out / "runs" / r["id"]
        assert (run_dir / "final" / "config.json").exists() and not (run_dir / "checkpoints").exists()
        assert not (run_dir / "data").exists()  # one tokenised corpus for all runs: OUT/data
    assert all("b" in f and "b_err" in f for f in res["fits"].values())
    assert [c["claim"] for c in res["claims"]] == [
        "Hybrids beat pure softmax at every budget", "Larger M wins at larger budgets",
        "Hybrids keep the retrieval and extrapolation that pure linear loses"]
    assert res["claims"][1]["verdict"] == res["claims"][2]["verdict"] == "not tested"  # one hybrid, no linear
    assert res["claims"][0]["verdict"] in ("reproduced", "partly reproduced", "not reproduced")
    for name in ("loss_vs_flops.png", "retrieval.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 20000
    md = (out / "report.md").read_text()
    for section in ("## Parameter matching", "## Validation loss per run", "## Power-law fits", "## Retrieval",
                    "## The paper's claims", "Scale caveat"):
        assert section in md
    assert "| M=3 | 0.2M |" in md and res["claims"][0]["verdict"] in p.stdout


def test_second_invocation_skips_finished_runs(quick):
    out, _ = quick
    before = {d: os.path.getmtime(out / "runs" / d / "result.json") for d in os.listdir(out / "runs")}
    p = subprocess.run([sys.executable, "-m", "ringlinear", "sweep", "--quick", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "8 finished earlier, 0 to run" in p.stderr and "done " not in p.stderr
    assert before == {d: os.path.getmtime(out / "runs" / d / "result.json") for d in os.listdir(out / "runs")}


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch, keep_threads, capsys):
    import ringlinear.sweep.plan as plan
    grid = ["sweep", "--quick", "--ratios", "linear", "--sizes", "0.2M", "--budgets", "1e11", "--jobs", "1",
            "--threads", "1", "--no-progress"]
    assert main(grid + ["--out", str(tmp_path / "a")]) == 0  # the uninterrupted reference
    ref = json.loads((tmp_path / "a" / "runs" / "linear-0.2M-1e11" / "result.json").read_text())
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "tokenizer", tmp_path / "b" / "tokenizer")  # the same BPE for both
    real = plan.train_config
    monkeypatch.setattr(plan, "train_config", lambda out, spec: real(out, spec).replace(stop_at=spec["steps"] // 2))
    assert main(grid + ["--out", str(tmp_path / "b")]) == 1  # stopped half way, as a killed sweep would be
    run_b = tmp_path / "b" / "runs" / "linear-0.2M-1e11"
    assert "stopped at step" in capsys.readouterr().err and not (run_b / "result.json").exists()
    assert os.listdir(run_b / "checkpoints") == [f"step-{ref['steps'] // 2:07d}"]
    monkeypatch.setattr(plan, "train_config", real)
    assert main(grid + ["--out", str(tmp_path / "b")]) == 0
    got = json.loads((run_b / "result.json").read_text())
    assert got["resumed_from_step"] == ref["steps"] // 2 and got["steps"] == ref["steps"]
    assert got["val_loss"] == ref["val_loss"] and got["train_loss"] == ref["train_loss"]  # exact resume
    assert not (run_b / "error.txt").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--ratios", "softmax,2x"], "--ratios: '2x'"), (["--sizes", "5Q"], "--sizes: '5Q'"),
    (["--budgets", "lots"], "--budgets: 'lots'"), (["--jobs", "0"], "--jobs must be >= 1"),
    (["--device", "tpu"], "--device 'tpu'"), (["--data", "/no/such/corpus"], "no such file or directory"),
    (["--quick", "--budgets", "1e6"], "fewer than --min-steps"), (["--retrieval-fraction", "0.9"], "[0, 0.5]"),
    (["--depth", "8", "--ratios", "15"], "ratio 15 needs at least 16 layers"),
    (["--sizes", "0.1M"], "too small for 8 layers"), (["--seq-len", "4"], "--seq-len must be")])
def test_bad_flags_one_line_before_any_work(tmp_path, capsys, flags, msg):
    out = tmp_path / "never"
    assert main(["sweep", "--out", str(out)] + flags) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and msg in err, err
    assert not out.exists()


def test_changed_recipe_is_refused(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"seq_len": 256}))
    assert main(["sweep", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "another recipe" in err and "seq_len: 256 -> 128" in err


def test_run_status_when_the_grid_grows_or_shrinks(tmp_path):
    from ringlinear.sweep.runs import RESULT, prepare_dir, status
    spec = {"id": "m3-5M-1e15", "steps": 10, "retrieval": True, "model": {"hidden_size": 64}}
    run = str(tmp_path / "run")
    prepare_dir(run, spec)
    assert status(run, spec) == "new"
    (tmp_path / "run" / RESULT).write_text(json.dumps({"spec": spec, "retrieval": {"mqar": {}}}))
    assert status(run, spec) == "done"
    assert status(run, {**spec, "retrieval": False}) == "done"  # a larger budget was added: still finished
    (tmp_path / "run" / RESULT).write_text(json.dumps({"spec": {**spec, "retrieval": False}, "retrieval": None}))
    assert status(run, spec) == "eval"  # now the largest budget: score the saved model, do not retrain
    prepare_dir(run, {**spec, "steps": 11})  # another recipe: the stale result goes
    assert status(run, {**spec, "steps": 11}) == "new" and not (tmp_path / "run" / RESULT).exists()


def test_record_file_without_text_names_the_sweep_remedy(tmp_path, capsys):
    """A directory is read whole: a .jsonl of other records fails in one line, with a remedy the sweep has (the
    train CLI's --text-field is not a sweep flag)."""
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.py").write_text("def f(x):\n    return x + 1\n" * 50)
    (data / "b.jsonl").write_text(json.dumps({"carat": 0.3, "cut": "ideal"}) + "\n")
    assert main(["sweep", "--quick", "--data", str(data), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "b.jsonl" in err and "no 'text' field" in err and "--text-field" not in err and "'DIR/**/*.py'" in err
