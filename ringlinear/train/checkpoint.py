"""Training checkpoints: `OUT/checkpoints/step-NNNNNNN/`, each a loadable model directory in the published layout
(config.json, safetensors, tokenizer files) plus `trainer_state.pt` (optimizer, scheduler, RNG, data position,
config) and `checkpoint.json`, a manifest with every file's size and sha256, written last.

Writing: everything goes to a `.tmp-*` directory beside the target (`models.checkpoint.atomic_directory`), which is
renamed into place only once complete; only after that are checkpoints of earlier steps beyond `keep_last` removed
(never those of later steps). A crash at any point leaves the previous checkpoints as they were and, at worst, a
`.tmp-*` directory that resume ignores.
Resuming: the chosen checkpoint is verified against its manifest before anything is loaded or written.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch

from ..models.checkpoint import atomic_directory, sha256_file, write_pretrained

log = logging.getLogger("ringlinear.train")

MANIFEST = "checkpoint.json"
STATE = "trainer_state.pt"
FORMAT = "ringlinear-train-checkpoint"
_STEP_RE = re.compile(r"^step-(\d+)$")


class TrainCheckpointError(ValueError):
    """A training checkpoint that cannot be resumed; the message names the file and the way out."""


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the `step-*` directories under root, oldest first (temp dirs ignored)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def rng_state() -> dict:
    st = np.random.get_state()
    d = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        d["cuda"] = torch.cuda.get_rng_state()
    return d


def set_rng_state(d: dict) -> None:
    torch.set_rng_state(d["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in d["python"]))
    n = d["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state(d["cuda"])


def save_checkpoint(root: str, step: int, model, tokenizer_dir: str, state: dict, keep_last: int) -> str:
    """Write checkpoint `step` atomically under root, then prune to the newest `keep_last`. Returns its path."""
    final = os.path.join(root, step_name(step))
    # An existing directory of the same step (--stop-at, then a resume that stops there) is replaced.
    with atomic_directory(final) as tmp:
        # the checkpoint dir is itself loadable; the weights' digests come from the writer (no second read)
        digests = write_pretrained(model, tmp, tokenizer_dir=tokenizer_dir)
        torch.save(state, os.path.join(tmp, STATE))
        files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)),
                     "sha256": digests.get(n) or sha256_file(os.path.join(tmp, n))} for n in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"format": FORMAT, "version": 1, "step": step, "config": state.get("config"), "files": files},
                      f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    # Retention counts back from this checkpoint, the newest one known good. Later steps, left by a run this one
    # resumed before (one of them perhaps the corrupt checkpoint that made the user resume from an older one), are
    # never removed here: they are not ours to judge, and deleting by step would keep them and drop the good ones.
    older = [path for s, path in list_checkpoints(root) if s < step]
    for path in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def remove_stale_temp(root: str) -> None:
    """Temp dirs of saves that were interrupted (a crash or kill mid-write)."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-step-"):
                log.info("removing the incomplete save %s", os.path.join(root, name))
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _quick_ok(path: str) -> bool:
    """Manifest present and every file of the right size (no hashing): good enough to suggest as a fallback."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
        return all(os.path.getsize(os.path.join(path, n)) == m["bytes"] for n, m in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify_checkpoint(path: str) -> dict:
    """Full check against the manifest (presence, size, sha256). Returns the manifest or raises
    TrainCheckpointError naming the problem and, where one exists, an earlier good checkpoint to resume from."""
    def fail(why: str):
        root = os.path.dirname(os.path.abspath(path))
        prev = [p for s, p in list_checkpoints(root) if os.path.abspath(p) != os.path.abspath(path) and _quick_ok(p)]
        hint = (f" Nothing was changed. The previous checkpoint {prev[-1]} looks complete: resume from it with "
                f"--resume {prev[-1]}" if prev else " Nothing was changed; no other complete checkpoint was found.")
        raise TrainCheckpointError(f"cannot resume from {path}: {why}.{hint}")

    if not os.path.isdir(path):
        fail("no such checkpoint directory")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        fail(f"no {MANIFEST} (an interrupted save, or not a `ringlinear train` checkpoint)")
    try:
        with open(mpath) as f:
            man = json.load(f)
        files = man["files"]
        if man.get("format") != FORMAT:
            fail(f"{MANIFEST} is not a {FORMAT} manifest")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        fail(f"{MANIFEST} is corrupt ({e})")
    for name, meta in sorted(files.items()):
        p = os.path.join(path, name)
        if not os.path.exists(p):
            fail(f"{name} is missing")
        size = os.path.getsize(p)
        if size != meta["bytes"]:
            fail(f"{name} is truncated or altered ({size} bytes, the manifest says {meta['bytes']})")
        if sha256_file(p) != meta["sha256"]:
            fail(f"{name} is corrupt (sha256 differs from the manifest)")
    return man


def load_trainer_state(path: str) -> dict:
    try:
        return torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainCheckpointError(f"cannot resume from {path}: {STATE} cannot be read ({e})") from None


def find_resume(out: str, resume: str) -> str:
    """'auto' -> the newest checkpoint under OUT/checkpoints; otherwise the given directory."""
    if resume != "auto":
        if not os.path.isdir(resume):
            raise TrainCheckpointError(f"--resume {resume}: no such checkpoint directory")
        return resume
    root = os.path.join(out, "checkpoints")
    cks = list_checkpoints(root)
    if not cks:
        raise TrainCheckpointError(f"--resume auto: no checkpoint under {root} (nothing to resume; drop --resume "
                                   "to start a new run)")
    return cks[-1][1]
