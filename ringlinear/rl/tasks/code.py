"""Write a Python function: the prompt is its signature and docstring, the completion its body. Reward 1 when every
unit test returns the expected value in the sandbox, else 0 (the share of passing cases is logged as task/pass).

The program run is prompt + completion, or, when the completion holds a fenced code block that defines the
function, that block alone. Completions stop at the usual HumanEval boundaries (a new top-level def, class, if,
print or comment). Values are compared in the parent, after JSON decoding, to expected values that never enter
the sandbox.
"""
from __future__ import annotations

import re

from . import Prompt, Score, Task, epoch_order
from .problems import PROBLEMS, Problem
from .sandbox import Limits, SandboxPool

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def program(problem: Problem, completion: str) -> str:
    for block in _FENCE.findall(completion):
        if re.search(rf"^def\s+{re.escape(problem.entry)}\s*\(", block, re.MULTILINE):
            return block
    return problem.prompt + completion


def _matches(got: dict, expected) -> bool:
    return got.get("ok") is True and got.get("value") == expected and type(got.get("value")) is type(expected)


class CodeTask(Task):
    name = "code"
    stop = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")

    def __init__(self, seed: int, problems: tuple[Problem, ...] = PROBLEMS, workers: int = 2,
                 limits: Limits | None = None):
        self.seed, self.problems = seed, problems
        self.pool = SandboxPool(workers, limits)

    def prompts(self, step: int, n: int) -> list[Prompt]:
        return [Prompt(self.problems[i].prompt, {"problem": i})
                for i in epoch_order(len(self.problems), self.seed, step, n)]

    def score(self, prompts, completions):
        probs = [self.problems[p.meta["problem"]] for p in prompts]
        runs = self.pool.map([(program(pb, c), pb.entry, [list(a) for a, _ in pb.cases])
                              for pb, c in zip(probs, completions)])
        out = []
        for pb, run in zip(probs, runs):
            passed = sum(_matches(r, e) for r, (_, e) in zip(run.results, pb.cases)) if run.status == "ok" else 0
            ok = float(passed == len(pb.cases))
            out.append(Score(ok, {"pass": passed / len(pb.cases), "timeout": float(run.status == "timeout")}))
        return out

    def close(self) -> None:
        self.pool.close()
