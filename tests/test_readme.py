"""The README's examples run as written, with the checkpoint path (and, without a GPU, the device) swapped for a
tiny local checkpoint."""
import os
import re
import subprocess
import sys

import pytest
import torch

from ringlinear.testing import make_tiny_checkpoint

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(lang: str) -> list[str]:
    with open(README) as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), flags=re.S)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("readme") / "m"))


def _localise(code: str, ckpt: str) -> str:
    code = code.replace("path/to/Ring-mini-linear-2.0", ckpt).replace('"DIR"', repr(ckpt))
    if not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"')
    return code


def test_python_examples_run(ckpt):
    blocks = _blocks("python")
    assert len(blocks) == 2
    for code in blocks:
        env = {**os.environ, "PYTHONPATH": os.path.dirname(README)}
        p = subprocess.run([sys.executable, "-c", _localise(code, ckpt)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]


def test_model_commands_run(ckpt):
    lines = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    cmds = [c for c in lines if c.startswith(("ringlinear info", "ringlinear generate --model DIR"))]
    assert len(cmds) == 2
    env = {**os.environ, "PYTHONPATH": os.path.dirname(README)}
    for cmd in cmds:
        argv = cmd.replace("DIR", ckpt).split()
        argv = [a.strip('"') for a in argv[1:]] + (["--max-new-tokens", "8"] if "generate" in cmd else [])
        p = subprocess.run([sys.executable, "-m", "ringlinear", *argv], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, (cmd, p.stderr[-3000:])
