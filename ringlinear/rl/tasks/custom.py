"""A user's task: prompts from a `.jsonl` file, rewards from a user's function.

Each line is a JSON object with "prompt" (text) or "messages" (a chat conversation, rendered with the checkpoint's
chat template); every other field is passed to the reward function untouched. `--reward module:function` names
it by import path (a dotted module on sys.path, or a path to a .py file); it is called as

    function(prompt: str, completion: str, record: dict) -> float

A reward that raises, returns NaN/inf or a non-number is malformed: the sample is left out of the update, counted
(`reward_errors` in metrics.jsonl) and the first message of each step is logged; the step goes on.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import os
import sys

from . import Prompt, Score, Task, epoch_order


def load_reward(spec: str):
    """'module:function' or 'path/to/file.py:function' -> the callable (one-line errors)."""
    mod_name, sep, fn_name = (spec or "").rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"--reward {spec!r}: expected module:function (e.g. my_rewards:score)")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise ValueError(f"--reward {spec!r}: no such file {mod_name}")
            name = "ringlinear_user_reward_" + os.path.splitext(os.path.basename(mod_name))[0]
            s = importlib.util.spec_from_file_location(name, mod_name)
            mod = importlib.util.module_from_spec(s)
            sys.modules[name] = mod
            s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
    except ValueError:
        raise
    except Exception as e:  # the user's module failed to import: say so in one line
        raise ValueError(f"--reward {spec!r}: cannot import {mod_name}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {mod_name} has no function {fn_name!r}")
    return fn


def read_prompts(path: str) -> list[dict]:
    """All records of a prompts .jsonl, checked (the line number is named in errors)."""
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file")
    recs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"--data {path}:{n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"--data {path}:{n}: expected a JSON object")
            p, m = rec.get("prompt"), rec.get("messages")
            if not (isinstance(p, str) and p) and not (isinstance(m, list) and m):
                raise ValueError(f"--data {path}:{n}: needs a non-empty \"prompt\" string or \"messages\" list")
            recs.append(rec)
    if not recs:
        raise ValueError(f"--data {path}: no prompts in the file")
    return recs


def check_reward(value):
    """-> (float, None) or (None, why it is malformed)."""
    if not isinstance(value, numbers.Real):
        return None, f"returned {type(value).__name__}, not a number"
    v = float(value)
    if not math.isfinite(v):
        return None, f"returned {v}"
    return v, None


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, path: str, reward: str, seed: int):
        self.records = read_prompts(path)
        self.fn = load_reward(reward)
        self.seed = seed

    def prompts(self, step: int, n: int) -> list[Prompt]:
        out = []
        for i in epoch_order(len(self.records), self.seed, step, n):
            rec = self.records[i]
            msgs = rec.get("messages") if not isinstance(rec.get("prompt"), str) else None
            out.append(Prompt(rec.get("prompt") or "", {"record": rec}, messages=msgs))
        return out

    def score(self, prompts, completions):
        out = []
        for p, c in zip(prompts, completions):
            try:
                v, why = check_reward(self.fn(p.text, c, p.meta["record"]))
            except Exception as e:  # the user's function: count it, keep going
                v, why = None, f"raised {type(e).__name__}: {e}"
            out.append(Score(v, error=None if why is None else f"reward function {why}"))
        return out
