"""Fixtures for the training tests, and the `slow` gate for this directory.

Slow tests (`@pytest.mark.slow`) run only with RINGLINEAR_SLOW=1 (`make test-all`); otherwise they are skipped with
the reason shown by `pytest -ra`.
"""
import os

import pytest

SLOW = os.environ.get("RINGLINEAR_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="slow test: set RINGLINEAR_SLOW=1 (make test-all) to run it")
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg(corpus):
    """make(out, **overrides): the tiny-test preset on the small corpus, quiet."""
    from ringlinear.train.config import get_train_preset

    def make(out, **kw):
        base = dict(data=[corpus], out=str(out), progress=False, plot=False)
        base.update(kw)
        return get_train_preset("tiny-test").replace(**base)
    return make
