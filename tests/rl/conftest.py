"""RL tests: the tiny random-weight checkpoint on CPU, one torch thread; slow tests behind RINGLINEAR_SLOW=1."""
import os

import pytest
import torch

from ringlinear.testing import make_tiny_checkpoint

SLOW = os.environ.get("RINGLINEAR_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="slow test: set RINGLINEAR_SLOW=1 (make test-all) to run it")
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("rl") / "tiny"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """write(source) -> 'module:function' spec of a reward module importable from tmp_path."""
    monkeypatch.syspath_prepend(str(tmp_path))

    count = [0]

    def write(source: str) -> str:
        count[0] += 1
        name = f"user_rewards_{tmp_path.name}_{count[0]}".replace("-", "_")  # fresh name: no stale sys.modules
        (tmp_path / f"{name}.py").write_text(source)
        return f"{name}:reward"
    return write


@pytest.fixture
def prompts_file(tmp_path):
    def write(records, name="prompts.jsonl"):
        import json
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(p)
    return write


@pytest.fixture
def parity_reward(reward_module):
    """A reward a random model earns sometimes: completions of even character length."""
    return reward_module("def reward(prompt, completion, record):\n    return float(len(completion) % 2 == 0)\n")
