"""Test-session setup shared by all tests, and the small real-code corpus the training tests read."""
import json
import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; it must be chosen before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def write_corpus(path, n_docs=60, max_bytes=6000):
    """A small .jsonl corpus of real code: the first `max_bytes` of some stdlib modules, one record each."""
    from ringlinear.train.data import stdlib_files
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
