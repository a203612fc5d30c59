"""Arithmetic with exact integer answers, generated from the seed. Reward 1 for the right number, 0 otherwise,
plus an optional format reward for answering with the bare number.

Prompt: "Q: 37 + 5 = ?\nA:"; the expected completion is " 42" then a newline or end of text. Levels:
1: a + b with single digits; 2: a + b or a - b up to 99; 3: +, -, * up to 99 (products up to 12 x 99);
4: three operands up to 99 with one pair of parentheses.
"""
from __future__ import annotations

import re

from . import Prompt, Score, Task, step_rng

LEVELS = (1, 2, 3, 4)
_BOXED = re.compile(r"\\boxed\{\s*(-?[\d,]+(?:\.\d+)?)\s*\}")
_STATED = re.compile(r"(?:answer\s*(?:is|:|=)?|=)\s*\**\s*(-?[\d,]*\d(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BARE = re.compile(r"\s*-?\d+\s*")


def make_problem(rng, level: int) -> tuple[str, int]:
    """-> (expression, its value)."""
    r = rng.randint
    if level == 1:
        a, b = r(0, 9), r(0, 9)
        return f"{a} + {b}", a + b
    if level == 2:
        a, b = r(0, 99), r(0, 99)
        return (f"{a} + {b}", a + b) if rng.random() < 0.5 else (f"{a} - {b}", a - b)
    if level == 3:
        op = rng.choice("+-*")
        a, b = r(0, 99), r(0, 12 if op == "*" else 99)
        return f"{a} {op} {b}", {"+": a + b, "-": a - b, "*": a * b}[op]
    if level == 4:
        a, b, c = r(0, 99), r(0, 99), r(0, 12)
        o1, o2 = rng.choice("+-"), rng.choice("+-*")
        expr = f"({a} {o1} {b}) {o2} {c}" if rng.random() < 0.5 else f"{c} {o2} ({a} {o1} {b})"
        return expr, int(eval(expr, {"__builtins__": {}}))  # our own digits and operators only
    raise ValueError(f"arithmetic difficulty must be one of {LEVELS}, got {level}")


def _parse(s: str):
    s = s.replace(",", "")
    try:
        v = float(s)
    except ValueError:
        return None
    return int(v) if v.is_integer() else v


def extract_answer(text: str):
    """The number a completion gives as its answer, or None. Tolerates '42', ' 42.', 'The answer is 42',
    '= 42', '**42**', '\\boxed{42}', '1,000', '42.0'; stops where the model starts a new question."""
    text = re.split(r"\n\s*Q\s*:", text)[0]
    for pat in (_BOXED, _STATED):
        hits = pat.findall(text)
        if hits:
            return _parse(hits[-1])
    m = _NUMBER.search(text)
    return _parse(m.group(0)) if m else None


class ArithmeticTask(Task):
    name = "arithmetic"
    stop = ("\n",)

    def __init__(self, seed: int, difficulty: int = 1, format_reward: float = 0.0):
        if difficulty not in LEVELS:
            raise ValueError(f"--difficulty must be one of {LEVELS}, got {difficulty}")
        self.seed, self.level, self.format_reward = seed, difficulty, format_reward

    def prompts(self, step: int, n: int) -> list[Prompt]:
        rng = step_rng(self.seed, step, "arithmetic")
        out = []
        for _ in range(n):
            expr, ans = make_problem(rng, self.level)
            out.append(Prompt(f"Q: {expr} = ?\nA:", {"answer": ans}))
        return out

    def score(self, prompts, completions):
        res = []
        for p, c in zip(prompts, completions):
            got = extract_answer(c)
            correct = got is not None and got == p.meta["answer"]
            fmt = _BARE.fullmatch(c) is not None
            res.append(Score(float(correct) + self.format_reward * fmt, {"correct": float(correct),
                                                                       "format": float(fmt)}))
        return res


def write_sft(path: str, n: int, difficulty: int = 1, seed: int = 1) -> str:
    """n worked examples "Q: a + b = ?\\nA: c" as a `ringlinear train --data` .jsonl (field "text"): a short SFT on
    these teaches a base model the task format before RL (docs/rl.md)."""
    import json
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rng = step_rng(seed, 0, "arithmetic-sft")
    with open(path, "w") as f:
        for _ in range(n):
            expr, ans = make_problem(rng, difficulty)
            f.write(json.dumps({"text": f"Q: {expr} = ?\nA: {ans}"}) + "\n")
    return path
