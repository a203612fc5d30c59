"""Built-in function-writing problems for the `code` task: a signature with a docstring (the prompt, HumanEval
style: the model writes the body) and unit tests as (arguments, expected return value) pairs, JSON values only."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    entry: str
    prompt: str
    cases: tuple  # ((args tuple, expected), ...)


def _p(signature: str, doc: str, cases) -> Problem:
    entry = signature.split("(")[0]
    return Problem(entry, f"def {signature}:\n    \"\"\"{doc}\"\"\"\n", tuple((tuple(a), e) for a, e in cases))


PROBLEMS = (
    _p("add(a, b)", "Return the sum of a and b.", [((1, 2), 3), ((-5, 5), 0), ((10, 32), 42), ((0, 0), 0)]),
    _p("is_even(n)", "Return True if n is even, else False.", [((2,), True), ((7,), False), ((0,), True),
                                                               ((-3,), False)]),
    _p("reverse_string(s)", "Return s reversed.", [(("abc",), "cba"), (("",), ""), (("racecar",), "racecar"),
                                                   (("ab c",), "c ba")]),
    _p("max_of_list(xs)", "Return the largest number in the non-empty list xs.",
       [(([1, 5, 3],), 5), (([-2, -9],), -2), (([7],), 7), (([0, 0, 1],), 1)]),
    _p("count_vowels(s)", "Return how many characters of s are vowels (a, e, i, o, u, either case).",
       [(("hello",), 2), (("",), 0), (("AEIOU xyz",), 5), (("rhythm",), 0)]),
    _p("factorial(n)", "Return n! for an integer n >= 0.", [((0,), 1), ((1,), 1), ((5,), 120), ((10,), 3628800)]),
    _p("fib(n)", "Return the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.",
       [((0,), 0), ((1,), 1), ((2,), 1), ((10,), 55), ((20,), 6765)]),
    _p("is_palindrome(s)", "Return True if s reads the same forwards and backwards.",
       [(("level",), True), (("abc",), False), (("",), True), (("abba",), True)]),
    _p("sum_of_squares(n)", "Return 1*1 + 2*2 + ... + n*n for n >= 0.", [((0,), 0), ((1,), 1), ((3,), 14),
                                                                       ((10,), 385)]),
    _p("fizzbuzz(n)", "Return 'FizzBuzz' if n is divisible by 15, 'Fizz' if by 3, 'Buzz' if by 5, else str(n).",
       [((15,), "FizzBuzz"), ((9,), "Fizz"), ((10,), "Buzz"), ((7,), "7")]),
    _p("gcd(a, b)", "Return the greatest common divisor of the non-negative integers a and b.",
       [((12, 18), 6), ((7, 5), 1), ((0, 9), 9), ((100, 75), 25)]),
    _p("is_prime(n)", "Return True if n is a prime number.", [((2,), True), ((1,), False), ((17,), True),
                                                              ((21,), False), ((97,), True)]),
    _p("unique_sorted(xs)", "Return the distinct elements of xs in increasing order, as a list.",
       [(([3, 1, 3, 2],), [1, 2, 3]), (([],), []), (([5, 5, 5],), [5])]),
    _p("flatten(xss)", "Return a list of the items of the lists in xss, in order.",
       [(([[1, 2], [3], []],), [1, 2, 3]), (([],), []), (([["a"], ["b", "c"]],), ["a", "b", "c"])]),
    _p("word_count(s)", "Return the number of whitespace-separated words in s.",
       [(("hello world",), 2), (("",), 0), (("  a  b   c ",), 3)]),
    _p("running_sum(xs)", "Return the list of prefix sums of xs.", [(([1, 2, 3],), [1, 3, 6]), (([],), []),
                                                                   (([5, -5, 2],), [5, 0, 2])]),
    _p("clamp(x, lo, hi)", "Return x limited to the range [lo, hi].", [((5, 0, 10), 5), ((-1, 0, 10), 0),
                                                                      ((11, 0, 10), 10)]),
    _p("digit_sum(n)", "Return the sum of the decimal digits of the non-negative integer n.",
       [((0,), 0), ((123,), 6), ((9999,), 36)]),
    _p("rotate_left(xs, k)", "Return xs rotated left by k positions (k >= 0; an empty list stays empty).",
       [(([1, 2, 3, 4], 1), [2, 3, 4, 1]), (([1, 2, 3], 3), [1, 2, 3]), (([1, 2, 3], 4), [2, 3, 1]),
        (([], 2), [])]),
    _p("capitalize_words(s)", "Return s with the first letter of every space-separated word upper-cased.",
       [(("hello world",), "Hello World"), (("a",), "A"), (("",), "")]),
    _p("merge_sorted(a, b)", "Return one sorted list with the items of the sorted lists a and b.",
       [(([1, 3], [2, 4]), [1, 2, 3, 4]), (([], [1]), [1]), (([1, 1], [1]), [1, 1, 1])]),
    _p("second_largest(xs)", "Return the second largest distinct value of xs, or None if there is none.",
       [(([1, 2, 3],), 2), (([5, 5],), None), (([4, 1, 4, 3],), 3)]),
)
