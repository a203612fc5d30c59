"""Fixtures for the training tests, and the `slow` gate for this directory.

Slow tests (`@pytest.mark.slow`) run only with RINGLINEAR_SLOW=1 (`make test-all`); otherwise they are skipped with
the reason shown by `pytest -ra`.
"""
import json
import os

import pytest

from ringlinear.train.data import stdlib_files

SLOW = os.environ.get("RINGLINEAR_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="slow test: set RINGLINEAR_SLOW=1 (make test-all) to run it")
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(skip)


def write_corpus(path, n_docs=60, max_bytes=6000):
    """A small .jsonl corpus of real code: the first `max_bytes` of some stdlib modules, one record each."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files = stdlib_files()
    with open(path, "w") as f:
        for p in files[:n_docs]:
            with open(p, encoding="utf-8", errors="replace") as g:
                text = g.read(max_bytes)
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "code.jsonl"))


@pytest.fixture
def tiny_cfg(corpus):
    """make(out, **overrides): the tiny-test preset on the small corpus, quiet."""
    from ringlinear.train.config import get_train_preset

    def make(out, **kw):
        base = dict(data=[corpus], out=str(out), progress=False, plot=False)
        base.update(kw)
        return get_train_preset("tiny-test").replace(**base)
    return make
