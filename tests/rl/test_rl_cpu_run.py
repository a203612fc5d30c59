"""The documented CPU run (`make rl-demo`, docs/rl.md): demo model -> 100-step SFT on the arithmetic format -> 60 GRPO
steps. The reward must rise. Slow: minutes of CPU (set RINGLINEAR_SLOW=1; RINGLINEAR_DEMO_DIR=runs/demo reuses a
trained demo model instead of training one first)."""
import json
import os
import subprocess
import sys

import pytest


def _run(args, timeout):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "ringlinear", *args], capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.mark.slow
def test_arithmetic_reward_rises_from_the_demo_model(tmp_path):
    from ringlinear.rl.tasks.arithmetic import write_sft
    demo = os.environ.get("RINGLINEAR_DEMO_DIR")
    if not demo:
        demo = str(tmp_path / "demo")
        _run(["train", "--out", demo, "--no-progress", "--threads", "1"], timeout=1800)
    sft = write_sft(str(tmp_path / "sft.jsonl"), n=4000)
    _run(["train", "--init-from", os.path.join(demo, "final"), "--data", sft, "--out", str(tmp_path / "sft"),
          "--steps", "100", "--schedule", "constant", "--lr", "1e-3", "--warmup-steps", "10", "--seq-len", "128",
          "--batch-size", "8", "--eval-every", "0", "--save-every", "0", "--threads", "1", "--no-progress"],
         timeout=1200)
    out = str(tmp_path / "rl")
    _run(["rl", "--model", str(tmp_path / "sft" / "final"), "--task", "arithmetic", "--out", out, "--steps", "60",
          "--prompts-per-step", "32", "--group-size", "8", "--max-new-tokens", "6", "--lr", "1e-4",
          "--warmup-steps", "5", "--threads", "1", "--no-progress"], timeout=1800)
    recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    first = sum(r["reward_mean"] for r in recs[:10]) / 10
    last = sum(r["reward_mean"] for r in recs[-10:]) / 10
    print(f"reward: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last > first + 0.08  # measured (docs/rl.md): see the CPU-run section
    assert os.path.exists(os.path.join(out, "reward.png")) and os.path.exists(os.path.join(out, "mismatch.png"))
