"""Countdown: the safe equation verifier (table-driven), generator, splits, loading, rewards."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from rlino.errors import UserError
from rlino.tasks import get_task
from rlino.tasks.countdown import CountdownTask, generate_instances, instance_key
from rlino.verify.countdown import (
    check_equation,
    evaluate_expression,
    extract_answer_block,
)

EXAMPLE = {"numbers": [3, 5, 7], "target": 22}
BIG = {"numbers": [25, 50, 75, 100], "target": 125}


def block(expr: str) -> str:
    return f"<think>trying</think> <answer>{expr}</answer>"


# (completion, example, correct, reward)
CASES = [
    # correct variants
    (block("3 * 5 + 7"), EXAMPLE, True, 1.0),
    (block("7 + 3 * 5"), EXAMPLE, True, 1.0),
    (block("5 * 3 + 7"), EXAMPLE, True, 1.0),
    (block("(3 * 5) + 7"), EXAMPLE, True, 1.0),
    (block("((3 * 5) + (7))"), EXAMPLE, True, 1.0),
    (block("3*5+7"), EXAMPLE, True, 1.0),
    (block("  3 *   5 + 7  "), EXAMPLE, True, 1.0),
    (block("\n3 * 5 + 7\n"), EXAMPLE, True, 1.0),
    (block("3 * 5 + 7 = 22"), EXAMPLE, True, 1.0),
    (block("3 * 5 + 7=22"), EXAMPLE, True, 1.0),
    (block("(7 - 3) * 5 + 2"), {"numbers": [7, 3, 5, 2], "target": 22}, True, 1.0),
    (
        block("100 - 75 + 50 / 25 * 50"),
        {"numbers": [100, 75, 50, 25, 50], "target": 125},
        True,
        1.0,
    ),
    (
        block("(100 + 50) - 75 / 25 * 25 / 3"),
        {"numbers": [100, 50, 75, 25, 25, 3], "target": 125},
        True,
        1.0,
    ),
    (block("100 + 50 - 75 / 25"), BIG, False, 0.1),  # right numbers, wrong value (147)
    (
        block("100 + 25 * (75 - 50) / 25"),
        {"numbers": [100, 25, 75, 50, 25], "target": 125},
        True,
        1.0,
    ),
    (
        block("7 / 2 * 2 + 15"),
        {"numbers": [7, 2, 2, 15], "target": 22},
        True,
        1.0,
    ),  # exact rationals
    (
        block("3 - 5 + 24"),
        {"numbers": [3, 5, 24], "target": 22},
        True,
        1.0,
    ),  # negative intermediate
    (block("(5 + 6) * 2"), {"numbers": [2, 5, 6], "target": 22}, True, 1.0),
    (block("2 * (5 + 6)"), {"numbers": [6, 5, 2], "target": 22}, True, 1.0),
    (block("((((3 * 5)))) + 7"), EXAMPLE, True, 1.0),
    (
        block("4 + 4 + 14"),
        {"numbers": [4, 14, 4], "target": 22},
        True,
        1.0,
    ),  # repeated given number
    # the last block is the one graded
    (block("3 + 5 + 7") + block("3 * 5 + 7"), EXAMPLE, True, 1.0),
    (block("3 * 5 + 7") + block("3 + 5 + 7"), EXAMPLE, False, 0.1),
    # wrong value / wrong multiset
    (block("3 + 5 + 7"), EXAMPLE, False, 0.1),
    (block("3 * 5 + 7 + 0"), EXAMPLE, False, 0.1),  # extra number
    (block("3 * 5 + 8 - 1"), EXAMPLE, False, 0.1),
    (block("15 + 7"), EXAMPLE, False, 0.1),  # numbers not given
    (block("3 * 7 + 1"), EXAMPLE, False, 0.1),  # 5 unused, 1 not given
    (block("3 * 5 + 7 + 3 - 3"), EXAMPLE, False, 0.1),  # 3 reused
    (block("4 + 18"), {"numbers": [4, 14, 4], "target": 22}, False, 0.1),
    (block("22"), EXAMPLE, False, 0.1),
    # trailing "= N"
    (block("3 * 5 + 7 = 23"), EXAMPLE, False, 0.1),
    (block("3 * 5 + 7 = 22 = 22"), EXAMPLE, False, 0.1),
    (block("22 = 3 * 5 + 7"), EXAMPLE, False, 0.1),
    (block("3 * 5 + 7 ="), EXAMPLE, False, 0.1),
    (block("3 * 5 + 7 = 22.0"), EXAMPLE, False, 0.1),
    # forbidden syntax
    (block("-3 + 5 * 7 - 10"), {"numbers": [3, 5, 7, 10], "target": 22}, False, 0.1),  # unary minus
    (block("(-3) * 5 + 37"), {"numbers": [3, 5, 37], "target": 22}, False, 0.1),
    (block("+3 * 5 + 7"), EXAMPLE, False, 0.1),  # unary plus
    (block("5 ** 2 - 3"), {"numbers": [5, 2, 3], "target": 22}, False, 0.1),
    (block("45 // 2 + 0"), {"numbers": [45, 2, 0], "target": 22}, False, 0.1),
    (block("4.4 * 5"), {"numbers": [4, 4, 5], "target": 22}, False, 0.1),  # decimals
    (block("3 × 5 + 7"), EXAMPLE, False, 0.1),  # not an ASCII operator
    (block("3 * 5 + 7 ;"), EXAMPLE, False, 0.1),
    (block("(3 * 5 + 7"), EXAMPLE, False, 0.1),  # unbalanced
    (block("3 * 5 + 7)"), EXAMPLE, False, 0.1),
    (block("3 * 5 +"), EXAMPLE, False, 0.1),
    (block("3 5 7"), EXAMPLE, False, 0.1),
    (block("()"), EXAMPLE, False, 0.1),
    (block("22 + 3 / (5 - 5) * 7"), {"numbers": [22, 3, 5, 5, 7], "target": 22}, False, 0.1),  # / 0
    (block("7 / 3 + 5"), {"numbers": [7, 3, 5], "target": 22}, False, 0.1),  # non-integer
    (block("0003 * 5 + 7"), EXAMPLE, True, 1.0),  # leading zeros are still the integer 3
    (block("1234567 - 1234545"), {"numbers": [1234567, 1234545], "target": 22}, False, 0.1),
    (block("(" * 21 + "3 * 5 + 7" + ")" * 21), EXAMPLE, False, 0.1),  # nesting > 20
    (block("(" * 20 + "3 * 5 + 7" + ")" * 20), EXAMPLE, True, 1.0),  # nesting = 20
    (block("3 * 5 + 7" + " " * 200), EXAMPLE, True, 1.0),  # outer spaces are stripped
    (block("3 *" + " " * 200 + "5 + 7"), EXAMPLE, False, 0.1),  # longer than 200 characters
    (block(""), EXAMPLE, False, 0.1),
    # no answer block
    ("3 * 5 + 7", EXAMPLE, False, 0.0),
    ("<answer>3 * 5 + 7", EXAMPLE, False, 0.0),  # unclosed tag
    ("3 * 5 + 7</answer>", EXAMPLE, False, 0.0),
    ("<answer>3 * 5 + 7</Answer>", EXAMPLE, False, 0.0),
    ("", EXAMPLE, False, 0.0),
]


@pytest.mark.parametrize(("completion", "example", "correct", "reward"), CASES)
def test_verifier_table(completion: str, example: dict, correct: bool, reward: float) -> None:
    score = CountdownTask().score(completion, example)
    assert (score.correct, score.reward) == (correct, reward)
    assert score.format_ok == (reward > 0)
    assert score.extracted == extract_answer_block(completion)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 + 2 * 3", Fraction(7)),
        ("(1 + 2) * 3", Fraction(9)),
        ("10 - 4 - 3", Fraction(3)),  # left-associative
        ("64 / 4 / 2", Fraction(8)),
        ("7 / 2", Fraction(7, 2)),
        ("1 / 3 * 3", Fraction(1)),
        ("2 - 5", Fraction(-3)),
        ("1 / 0", None),
        ("-1", None),
        ("2 ** 3", None),
        ("1 = 1", None),
        ("", None),
    ],
)
def test_evaluate_expression(text: str, value: Fraction | None) -> None:
    assert evaluate_expression(text) == value


def test_extract_answer_block() -> None:
    assert extract_answer_block("a <answer> x </answer> b <answer>y</answer>") == "y"
    assert extract_answer_block("<answer>a<answer>b</answer>") == "b"
    assert extract_answer_block("<answer>unclosed") is None
    assert extract_answer_block(None) is None  # type: ignore[arg-type]


def test_check_equation_rejects_wrong_target_given_as_rhs() -> None:
    assert check_equation("3 * 5 + 7 = 22", [3, 5, 7], 22)
    assert not check_equation("3 * 5 + 7 = 22", [3, 5, 7], 23)


def test_question_text() -> None:
    assert CountdownTask().question(EXAMPLE) == (
        "Using the numbers [3, 5, 7], create an equation that equals 22. You can use basic "
        "arithmetic operations (+, -, *, /) and each number can only be used once."
    )


def test_custom_rewards() -> None:
    task = get_task("countdown", correct_reward=2.0, format_reward=0.5)
    assert task.score(block("3 * 5 + 7"), EXAMPLE).reward == 2.0
    assert task.score(block("3 + 5 + 7"), EXAMPLE).reward == 0.5
    assert task.score("nothing", EXAMPLE).reward == 0.0


@pytest.mark.parametrize("num_numbers", [2, 3, 4, 5, 6])
def test_generated_instances_are_solved_by_their_hidden_solution(num_numbers: int) -> None:
    instances = generate_instances(300, num_numbers, 1, 99, 999, random.Random(1))
    assert len(instances) == 300
    for inst in instances:
        assert len(inst["numbers"]) == num_numbers
        assert all(1 <= n <= 99 for n in inst["numbers"])
        assert 1 <= inst["target"] <= 999
        assert check_equation(inst["solution"], inst["numbers"], inst["target"]), inst
        score = CountdownTask().score(block(inst["solution"]), inst)
        assert score.correct and score.reward == 1.0


def test_generator_is_deterministic_for_a_seed() -> None:
    a = generate_instances(50, 4, 1, 50, 500, random.Random(7))
    b = generate_instances(50, 4, 1, 50, 500, random.Random(7))
    c = generate_instances(50, 4, 1, 50, 500, random.Random(8))
    assert a == b and a != c


def test_generator_uses_every_operator_and_only_exact_divisions() -> None:
    instances = generate_instances(2000, 4, 1, 99, 999, random.Random(0))
    ops = {ch for inst in instances for ch in inst["solution"] if ch in "+-*/"}
    assert ops == set("+-*/")


def test_splits_are_fixed_disjoint_and_sized() -> None:
    task = CountdownTask(train_size=3000, test_size=300, seed=3)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 3000 and len(test) == 300
    test_keys = {instance_key(e) for e in test}
    assert len(test_keys) == 300  # the test split has no duplicates
    assert not test_keys & {instance_key(e) for e in train}
    again = CountdownTask(train_size=10, test_size=300, seed=3)
    assert again.examples("test") == test  # the test split does not depend on train_size
    assert CountdownTask(train_size=10, test_size=300, seed=4).examples("test") != test


def test_small_ranges_fail_clearly() -> None:
    with pytest.raises(UserError, match="distinct test instances"):
        CountdownTask(num_numbers=2, min_number=1, max_number=2, test_size=100).examples("test")
    with pytest.raises(UserError, match="num_numbers"):
        CountdownTask(num_numbers=9)
    with pytest.raises(UserError, match="splits"):
        CountdownTask().examples("validation")


def test_settings_are_json_serialisable() -> None:
    settings = CountdownTask(num_numbers=4, seed=2).settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["num_numbers"] == 4 and settings["format_reward"] == 0.1


def test_loads_tinyzero_schema_and_splits_by_seeded_shuffle(tmp_path: Path) -> None:
    rows = generate_instances(120, 3, 1, 30, 300, random.Random(0))
    path = tmp_path / "cd.jsonl"
    path.write_text(
        "".join(json.dumps({"nums": r["numbers"], "target": r["target"]}) + "\n" for r in rows)
    )
    task = CountdownTask(path=str(path), test_size=20, seed=1)
    train, test = task.examples("train"), task.examples("test")
    assert len(test) == 20 and 80 <= len(train) <= 100
    assert not {instance_key(e) for e in test} & {instance_key(e) for e in train}
    assert {instance_key(e) for e in train + test} <= {instance_key(r) for r in rows}
    assert CountdownTask(path=str(path), test_size=20, seed=1).examples("test") == test
    assert CountdownTask(path=str(path), test_size=20, seed=2).examples("test") != test


def test_loads_parquet_directory_with_splits(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = generate_instances(40, 4, 1, 30, 300, random.Random(0))
    pq.write_table(pa.Table.from_pylist(rows[:30]), tmp_path / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[30:]), tmp_path / "test-00000-of-00001.parquet")
    task = CountdownTask(path=str(tmp_path))
    test = task.examples("test")
    assert [e["numbers"] for e in test] == [r["numbers"] for r in rows[30:]]
    assert all(check_equation(e["solution"], e["numbers"], e["target"]) for e in test)


def test_bad_loaded_rows_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"nums": [1, 2], "target": "x"}) + "\n")
    with pytest.raises(UserError, match="target"):
        CountdownTask(path=str(path)).examples("test")
    with pytest.raises(UserError, match="does not exist"):
        CountdownTask(path=str(tmp_path / "missing.jsonl")).examples("test")
