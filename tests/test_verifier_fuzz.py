"""Both verifiers (GSM8K with flexible and strict extraction) on random and hostile strings: no
exception escapes, and every call is fast.

Each call is timed as the best of 3 runs (so a scheduler hiccup on a busy machine is not counted)
and must take under 10 ms. Hypothesis budgets are kept moderate so this file runs in seconds.
"""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlino.tasks.countdown import CountdownTask
from rlino.tasks.gsm8k import GSM8KTask
from rlino.verify.countdown import evaluate_expression, extract_answer_block
from rlino.verify.gsm8k import find_answer, gold_from_solution, parse_number

LIMIT_S = 0.010
GSM8K = GSM8KTask()
GSM8K_STRICT = GSM8KTask(extraction="strict")
COUNTDOWN = CountdownTask()
GSM8K_EXAMPLE = {"gold": "18"}
COUNTDOWN_EXAMPLE = {"numbers": [3, 5, 7], "target": 22}

HOSTILE = [
    "(" * 5000,
    "(" * 5000 + "1" + ")" * 5000,
    "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    "<answer>" + "(" * 150 + "1" + ")" * 49 + "</answer>",
    "<answer>" + "(" * 21 + "3*5+7" + ")" * 21 + "</answer>",
    "9" * 10_000,
    "<answer>" + "9" * 10_000 + "</answer>",
    "<answer>" + "9" * 190 + "</answer>",
    "#### " + "9" * 10_000,
    "\\boxed{" + "9" * 10_000 + "}",
    "9**9**9**9",
    "<answer>9**9**9**9</answer>",
    "<answer>999999*999999*999999*999999*999999*999999*999999*999999*999999*999999</answer>",
    "<answer>1/999999/999999/999999/999999/999999/999999/999999/999999/999999/999999</answer>",
    "\x00" * 10_000,
    "<answer>\x00</answer>",
    "<answer>" * 10_000,
    "</answer>" * 10_000,
    "<answer></answer>" * 10_000,
    "<answer>" * 10_000 + "3*5+7</answer>",
    "<answer>" + "1+" * 5000 + "</answer>",
    "\\boxed{" * 10_000,
    "\\boxed{" + "{" * 10_000,
    "#" * 100_000,
    "####\n" * 10_000,
    "#### x " * 10_000,
    "the answer is " * 10_000,
    "The Answer Is: $" * 10_000,
    "1 " * 100_000,
    "1," * 50_000,
    "$-" * 50_000,
    "-" * 100_000 + "1",
    "1/" * 50_000,
    "1." * 50_000,
    "\\frac{" * 10_000,
    "\\frac{1}{" + "0" * 10_000 + "}",
    "5/" + "0" * 10_000,
    "=" * 100_000,
    "a" * 1_000_000,
    "\ud800\udfff" * 1000,
]

FRAGMENTS = [
    "(",
    ")",
    "<answer>",
    "</answer>",
    "<answer",
    "\\boxed{",
    "{",
    "}",
    "####",
    "the answer is ",
    "\\frac{",
    "9",
    "0",
    "12",
    "999999",
    "1234567",
    "**",
    "//",
    "*",
    "/",
    "+",
    "-",
    "−",
    "$",
    "\\$",
    ",",
    ".",
    "=",
    " ",
    "\n",
    "\t",
    "\x00",
    "e",
    "x",
    "%",
    "{,}",
]
hostile_text = st.lists(st.sampled_from(FRAGMENTS), max_size=200).map("".join)
any_text = st.one_of(st.text(max_size=500), hostile_text)


def timed(fn, *args):
    """Call fn(*args) 3 times; return the result and the fastest wall time."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


def check_gsm8k(text: str) -> float:
    worst = 0.0
    for task in (GSM8K, GSM8K_STRICT):
        score, elapsed = timed(task.score, text, GSM8K_EXAMPLE)
        assert isinstance(score.correct, bool) and score.reward in (0.0, 1.0)
        assert isinstance(score.extracted, str | None)
        worst = max(worst, elapsed)
    strict = GSM8K_STRICT.score(text, GSM8K_EXAMPLE)
    assert strict.format_ok or (strict.extracted is None and not strict.correct)
    assert not strict.correct or GSM8K.score(text, GSM8K_EXAMPLE).correct  # strict only drops
    return worst


def find_answer_strict(text: str) -> object:
    return find_answer(text, "strict")


def check_countdown(text: str) -> float:
    score, elapsed = timed(COUNTDOWN.score, text, COUNTDOWN_EXAMPLE)
    assert score.reward in (0.0, 0.1, 1.0)
    assert score.format_ok == (score.extracted is not None)
    return elapsed


def check_helpers(text: str) -> float:
    worst = 0.0
    for fn in (
        evaluate_expression,
        extract_answer_block,
        parse_number,
        gold_from_solution,
        find_answer,
        find_answer_strict,
    ):
        _, elapsed = timed(fn, text)
        worst = max(worst, elapsed)
    value = evaluate_expression(text)
    assert value is None or isinstance(value, Fraction)
    return worst


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs_are_safe_and_fast(text: str) -> None:
    worst = max(check_gsm8k(text), check_countdown(text), check_helpers(text))
    assert worst < LIMIT_S, f"{worst * 1000:.1f} ms"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_text)
def test_random_and_composed_inputs_are_safe_and_fast(text: str) -> None:
    worst = max(check_gsm8k(text), check_countdown(text), check_helpers(text))
    assert worst < LIMIT_S, f"{worst * 1000:.1f} ms"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=6), st.integers(-(10**7), 10**7))
def test_countdown_score_never_raises_on_any_example(numbers: list[int], target: int) -> None:
    text = "<answer>" + " + ".join(str(n) for n in numbers) + "</answer>"
    score = COUNTDOWN.score(text, {"numbers": numbers, "target": target})
    assert score.correct == (sum(numbers) == target and max(numbers) < 10**6)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**12), 10**12), st.sampled_from(["#### {}", "<answer>{}</answer>", "{}"]))
def test_gsm8k_integers_round_trip(value: int, form: str) -> None:
    """Every integer written plainly or with thousands commas is read back exactly."""
    for written in (str(value), f"{value:,}"):
        score = GSM8K.score(form.format(written), {"gold": str(value)})
        assert score.correct, written
