"""Reading corpora into documents: the embedded default, or files, directories and globs given by the user.

A document is one text file, one .jsonl record or one .parquet row. Every failure names the file (and line) and
what was wrong, so a bad corpus is fixed in one go rather than discovered mid-run.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig

import numpy as np

log = logging.getLogger("ringlinear.train")

TEXT_EXT = (".txt", ".text", ".md", ".py")
JSONL_EXT = (".jsonl", ".ndjson")
PARQUET_EXT = (".parquet",)
SUPPORTED = TEXT_EXT + JSONL_EXT + PARQUET_EXT
# Stdlib folders that are tests, demos or vendored data rather than library code a newcomer wants to imitate.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__",
                "lib2to3", "ensurepip", "pydoc_data", "encodings"}


class DataError(ValueError):
    """The corpus cannot be used; the message says which file and why."""


def stdlib_files() -> list[str]:
    """The running interpreter's standard-library .py sources, sorted (the embedded default corpus)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP and not x.startswith(("config-", "plat-")))
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    if not out:
        raise DataError(f"no standard-library sources under {root} (a Python without its .py files?); "
                        "pass --data")
    return out


def resolve_inputs(specs: list[str]) -> list[str]:
    """Files, directories (recursive) and globs -> sorted unique list of supported files; clear errors otherwise."""
    if not specs:
        return stdlib_files()
    files: list[str] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            hits = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not hits:
                raise DataError(f"--data {spec!r}: the pattern matches no file")
            bad = [p for p in hits if not p.endswith(SUPPORTED)]
            if len(bad) == len(hits):
                raise DataError(f"--data {spec!r}: matches {len(hits)} file(s), none of a supported type {SUPPORTED}")
            files += [p for p in hits if p.endswith(SUPPORTED)]
        elif os.path.isdir(spec):
            found = []
            for d, dirs, names in os.walk(spec):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                found += [os.path.join(d, n) for n in sorted(names) if n.endswith(SUPPORTED)]
            if not found:
                raise DataError(f"--data {spec!r}: directory has no {'/'.join(SUPPORTED)} files")
            files += found
        elif os.path.isfile(spec):
            if not spec.endswith(SUPPORTED):
                raise DataError(f"--data {spec!r}: unsupported file type (use {', '.join(SUPPORTED)})")
            files.append(spec)
        else:
            raise DataError(f"--data {spec!r}: no such file or directory")
    seen, uniq = set(), []
    for p in files:
        a = os.path.abspath(p)
        if a not in seen:
            seen.add(a)
            uniq.append(p)
    return uniq


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
        log.warning("%s: not valid UTF-8; undecodable bytes replaced by U+FFFD", path)
    return text


def _read_jsonl(path: str, field: str, remedy: str):
    try:
        f = open(path, encoding="utf-8", errors="strict")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or field not in rec:
                    keys = sorted(rec)[:8] if isinstance(rec, dict) else type(rec).__name__
                    raise DataError(f"{path}:{n}: record has no {field!r} field (has {keys}); {remedy}")
                if not isinstance(rec[field], str):
                    raise DataError(f"{path}:{n}: field {field!r} is {type(rec[field]).__name__}, not a string")
                yield rec[field]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_parquet(path: str, field: str, remedy: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install 'ringlinear[train]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid, OSError: the message says what is wrong with the file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    cols = pf.schema_arrow.names
    if field not in cols:
        raise DataError(f"{path}: no column {field!r} (columns: {cols[:8]}); {remedy}")
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=4096):
            for v in batch.column(0).to_pylist():
                if v is not None and not isinstance(v, str):
                    raise DataError(f"{path}: column {field!r} holds {type(v).__name__}, not strings")
                if v:
                    yield v
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: parquet data cannot be read ({e})") from None


def read_documents(files: list[str], text_field: str = "text", remedy: str = "set --text-field") -> list[str]:
    """All non-empty documents of `files`, in file order then record order. remedy: what the error for a record
    file without `text_field` tells the user to do (the caller's own flags)."""
    docs: list[str] = []
    empty = 0
    for p in files:
        before = len(docs)
        if p.endswith(JSONL_EXT):
            docs += [t for t in _read_jsonl(p, text_field, remedy) if t.strip()]
        elif p.endswith(PARQUET_EXT):
            docs += [t for t in _read_parquet(p, text_field, remedy) if t.strip()]
        else:
            t = _read_text(p)
            if t.strip():
                docs.append(t)
        empty += len(docs) == before
    if not docs:
        what = "the file is" if len(files) == 1 else f"all {len(files)} files are"
        raise DataError(f"no text to train on: {what} empty ({', '.join(files[:3])}"
                        f"{' ...' if len(files) > 3 else ''})")
    if empty:
        log.info("skipped %d empty file(s)", empty)
    return docs


def corpus_fingerprint(files: list[str], text_field: str) -> str:
    """Changes when any input file changes (path, size, mtime): keys the tokenised-data cache."""
    h = hashlib.sha256(f"{text_field}|{sys.version_info[:2]}".encode())
    for p in files:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def split_documents(docs: list[str], val_fraction: float, seed: int, max_mb: float = 0.0):
    """Deterministic shuffle, then held-out validation documents. Returns (train_docs, val_docs).

    With a single document the split is inside it (at a line break), so there is always something to validate on.
    """
    if len(docs) == 1 and val_fraction > 0:
        t = docs[0]
        cut = t.rfind("\n", 0, int(len(t) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(t) * (1 - val_fraction))
        train, val = [t[:cut]], [t[cut:]]
    else:
        order = np.random.default_rng(seed).permutation(len(docs)).tolist()
        n_val = int(round(len(docs) * val_fraction))
        if val_fraction > 0:
            n_val = min(max(n_val, 1), len(docs) - 1)
        val = [docs[i] for i in order[:n_val]]
        train = [docs[i] for i in order[n_val:]]
    if max_mb > 0:
        train = take_bytes(train, max_mb * 1e6)
        val = take_bytes(val, max(max_mb * 1e6 * max(val_fraction, 0.01), 1))
    if not train:
        raise DataError("no training documents left after the validation split; lower --val-fraction")
    return train, val


def take_bytes(docs: list[str], budget: float) -> list[str]:
    """Leading documents until `budget` characters are reached (the one crossing it included)."""
    kept, size = [], 0
    for d in docs:
        if size >= budget:
            break
        kept.append(d)
        size += len(d)
    return kept
