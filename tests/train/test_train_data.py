"""Corpus input: formats, directories, globs, the embedded default, clear errors, deterministic split."""
import json
import os

import pytest

from ringlinear.train.data import (DataError, read_documents, resolve_inputs, split_documents, stdlib_files,
                                   take_bytes)


def _write(p, text):
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(text)
    return str(p)


def test_formats_dirs_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    _write(tmp_path / "d" / "a.txt", "alpha text\n")
    _write(tmp_path / "d" / "sub" / "b.jsonl", json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}))
    pq.write_table(pa.table({"text": ["delta", None, "", "eps"], "id": [1, 2, 3, 4]}), tmp_path / "d" / "c.parquet")
    _write(tmp_path / "d" / "skip.csv", "x,y\n")
    _write(tmp_path / "d" / ".hidden" / "h.txt", "hidden\n")
    files = resolve_inputs([str(tmp_path / "d")])
    assert [os.path.basename(f) for f in files] == ["a.txt", "c.parquet", "b.jsonl"]
    assert read_documents(files) == ["alpha text\n", "delta", "eps", "beta", "gamma"]
    assert resolve_inputs([str(tmp_path / "d" / "**" / "*.jsonl")]) == [str(tmp_path / "d" / "sub" / "b.jsonl")]
    # the same file named twice (dir + file) is read once
    assert len(resolve_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "a.txt")])) == 3


def test_embedded_default_is_the_stdlib():
    files = resolve_inputs([])
    assert files == stdlib_files() and len(files) > 100
    assert any(f.endswith(os.path.join("json", "decoder.py")) for f in files)
    assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for f in files)


@pytest.mark.parametrize("make,spec,msg", [
    (None, "nope.txt", "no such file or directory"),
    (None, "nothing-*.txt", "matches no file"),
    ("x.csv", "x.csv", "unsupported file type"),
    ("emptydir/", "emptydir", "directory has no"),
])
def test_input_errors(tmp_path, make, spec, msg):
    if make and make.endswith("/"):
        os.makedirs(tmp_path / make)
    elif make:
        _write(tmp_path / make, "a,b\n")
    with pytest.raises(DataError, match=msg):
        resolve_inputs([str(tmp_path / spec)])


def test_unreadable_and_empty_inputs(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_documents([bad])
    nofield = _write(tmp_path / "nofield.jsonl", json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"nofield.jsonl:1: record has no 'text' field \(has \['content'\]\)"):
        read_documents([nofield])
    assert read_documents([nofield], text_field="content") == ["x"]
    notstr = _write(tmp_path / "n.jsonl", json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="is int, not a string"):
        read_documents([notstr])
    broken = _write(tmp_path / "broken.parquet", "PAR1 this is not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable parquet file"):
        read_documents([broken])
    empties = [_write(tmp_path / "e1.txt", ""), _write(tmp_path / "e2.txt", "  \n\n")]
    with pytest.raises(DataError, match="no text to train on: all 2 files are empty"):
        read_documents(empties)
    os.chmod(tmp_path / "e1.txt", 0)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(DataError, match="cannot read"):
            read_documents([str(tmp_path / "e1.txt")])


def test_split_is_deterministic_and_held_out():
    docs = [f"doc {i}\n" * 10 for i in range(100)]
    tr, va = split_documents(docs, 0.1, seed=0)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert split_documents(docs, 0.1, seed=0) == (tr, va)
    assert split_documents(docs, 0.1, seed=1) != (tr, va)
    one_tr, one_va = split_documents(["line\n" * 100], 0.1, seed=0)  # one document: split at a line break
    assert one_tr[0] + one_va[0] == "line\n" * 100 and one_va[0].startswith("\n") and len(one_va[0]) < 60
    small_tr, _ = split_documents(docs, 0.1, seed=0, max_mb=200 / 1e6)
    assert len(small_tr) == 3 and take_bytes(docs, 1) == docs[:1]
    with pytest.raises(DataError, match="no training documents"):
        split_documents([], 0.5, seed=0)
