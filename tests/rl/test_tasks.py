"""Tasks: deterministic prompts, exact answers, robust extraction, code scoring, a user's rewards."""
import math

import pytest

from ringlinear.rl.tasks import Prompt, epoch_order, step_rng
from ringlinear.rl.tasks.arithmetic import ArithmeticTask, extract_answer, make_problem
from ringlinear.rl.tasks.code import CodeTask, program
from ringlinear.rl.tasks.custom import JsonlTask, check_reward, load_reward, read_prompts
from ringlinear.rl.tasks.problems import PROBLEMS
from ringlinear.rl.tasks.sandbox import Limits


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_arithmetic_answers_are_exact(level):
    rng = step_rng(3, 0, "t")
    for _ in range(200):
        expr, ans = make_problem(rng, level)
        assert isinstance(ans, int)
        # independent check: evaluate the printed expression with Python's own parser
        assert eval(expr, {"__builtins__": {}}) == ans, expr  # noqa: S307 (digits and + - * ( ) only)
        assert set(expr) <= set("0123456789+-*() ")


def test_arithmetic_prompts_depend_only_on_seed_and_step():
    a, b = ArithmeticTask(7, 2), ArithmeticTask(7, 2)
    assert [p.text for p in a.prompts(5, 8)] == [p.text for p in b.prompts(5, 8)]
    assert [p.text for p in a.prompts(5, 8)] != [p.text for p in a.prompts(6, 8)]
    assert [p.text for p in a.prompts(5, 8)] != [p.text for p in ArithmeticTask(8, 2).prompts(5, 8)]
    assert a.prompts(0, 1)[0].text.startswith("Q: ") and a.prompts(0, 1)[0].text.endswith(" = ?\nA:")


@pytest.mark.parametrize("text,value", [
    (" 42", 42), ("42\n", 42), (" 42.", 42), ("The answer is 42.", 42), ("= 42", 42), (" **42**", 42),
    ("\\boxed{42}", 42), (" 1,000", 1000), (" -7", -7), ("42.0", 42), (" 12 + 30 = 42", 42),
    (" 5\nQ: 1 + 1 = ?\nA: 2", 5), ("no idea", None), ("", None), (" 3.5", 3.5),
])
def test_answer_extraction(text, value):
    assert extract_answer(text) == value


def test_arithmetic_reward_and_format_reward():
    t = ArithmeticTask(0, 1, format_reward=0.25)
    p = Prompt("Q: 3 + 4 = ?\nA:", {"answer": 7})
    s = t.score([p] * 4, [" 7", " The answer is 7", " 8", ""])
    assert [x.reward for x in s] == [1.25, 1.0, 0.25, 0.0]
    assert [x.info["correct"] for x in s] == [1.0, 1.0, 0.0, 0.0]


def test_epoch_order_visits_every_item_once_per_epoch():
    seen = [i for s in range(5) for i in epoch_order(10, 1, s, 4)]  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]


def test_builtin_problems_have_consistent_tests():
    # A reference solution for each problem passes its own tests in the sandbox (and a wrong one fails).
    refs = {"add": "return a + b", "is_even": "return n % 2 == 0", "reverse_string": "return s[::-1]",
            "max_of_list": "return max(xs)", "count_vowels": "return sum(c in 'aeiouAEIOU' for c in s)",
            "factorial": "import math\n    return math.factorial(n)",
            "fib": "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
            "is_palindrome": "return s == s[::-1]", "sum_of_squares": "return sum(i * i for i in range(n + 1))",
            "fizzbuzz": "return 'FizzBuzz' if n % 15 == 0 else 'Fizz' if n % 3 == 0 else 'Buzz' if n % 5 == 0 "
                        "else str(n)",
            "gcd": "import math\n    return math.gcd(a, b)",
            "is_prime": "return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
            "unique_sorted": "return sorted(set(xs))", "flatten": "return [x for xs in xss for x in xs]",
            "word_count": "return len(s.split())", "running_sum": "import itertools\n    return list(itertools.accumulate(xs))",
            "clamp": "return max(lo, min(x, hi))", "digit_sum": "return sum(map(int, str(n)))",
            "rotate_left": "return xs[k % len(xs):] + xs[:k % len(xs)] if xs else []",
            "capitalize_words": "return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
            "merge_sorted": "return sorted(a + b)",
            "second_largest": "u = sorted(set(xs))\n    return u[-2] if len(u) > 1 else None"}
    assert set(refs) == {p.entry for p in PROBLEMS}
    task = CodeTask(0, workers=2, limits=Limits(cpu_s=2, wall_s=5))
    try:
        prompts = [Prompt(p.prompt, {"problem": i}) for i, p in enumerate(PROBLEMS)]
        good = task.score(prompts, ["    " + refs[p.entry] + "\n" for p in PROBLEMS])
        bad = task.score(prompts, ["    return None\n" for _ in PROBLEMS])
    finally:
        task.close()
    assert [s.reward for s in good] == [1.0] * len(PROBLEMS)
    assert all(s.reward == 0.0 for s in bad)


def test_code_program_uses_a_fenced_definition():
    add = PROBLEMS[0]
    assert program(add, "    return a + b") == add.prompt + "    return a + b"
    fenced = "Here:\n```python\ndef add(a, b):\n    return b + a\n```\nDone."
    assert program(add, fenced) == "def add(a, b):\n    return b + a\n"


def test_load_reward_errors(reward_module, tmp_path):
    with pytest.raises(ValueError, match="expected module:function"):
        load_reward("nocolon")
    with pytest.raises(ValueError, match="cannot import no_such_module_xyz"):
        load_reward("no_such_module_xyz:f")
    spec = reward_module("def reward(p, c, r):\n    return 1.0\n")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_reward(spec.split(":")[0] + ":nope")
    assert load_reward(spec)("p", "c", {}) == 1.0
    f = tmp_path / "by_path.py"
    f.write_text("def score(p, c, r):\n    return len(c)\n")
    assert load_reward(f"{f}:score")("p", "abc", {}) == 3
    with pytest.raises(ValueError, match="no such file"):
        load_reward(str(tmp_path / "missing.py") + ":score")


def test_check_reward():
    assert check_reward(1) == (1.0, None) and check_reward(True) == (1.0, None)
    assert check_reward(float("nan"))[0] is None and "nan" in check_reward(float("nan"))[1]
    assert check_reward(math.inf)[0] is None
    assert check_reward("1.0") == (None, "returned str, not a number")
    assert check_reward(None)[1] == "returned NoneType, not a number"


def test_malformed_rewards_are_counted_and_the_rest_scored(reward_module, prompts_file):
    src = ("import math\n"
           "def reward(prompt, completion, record):\n"
           "    kind = record['kind']\n"
           "    if kind == 'raise': raise KeyError('boom')\n"
           "    if kind == 'nan': return math.nan\n"
           "    if kind == 'str': return 'high'\n"
           "    return len(completion)\n")
    spec = reward_module(src)
    path = prompts_file([{"prompt": "a", "kind": k} for k in ("ok", "raise", "nan", "str")])
    task = JsonlTask(path, spec, seed=0)
    prompts = [Prompt("a", {"record": {"kind": k}}) for k in ("ok", "raise", "nan", "str")]
    s = task.score(prompts, ["xyz"] * 4)
    assert s[0].reward == 3.0 and s[0].error is None
    assert [x.reward for x in s[1:]] == [None, None, None]
    assert "raised KeyError" in s[1].error and "returned nan" in s[2].error and "returned str" in s[3].error


def test_prompt_file_errors(prompts_file, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_prompts(str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_prompts(str(bad))
    with pytest.raises(ValueError, match=r":1: needs a non-empty"):
        read_prompts(prompts_file([{"text": "x"}]))
    recs = read_prompts(prompts_file([{"prompt": "x"}, {"messages": [{"role": "user", "content": "hi"}]}]))
    assert len(recs) == 2
