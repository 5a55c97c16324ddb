"""GSM8K: answer extraction and normalisation (table-driven), data loading, scoring and rewards."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from rlino.errors import UserError
from rlino.tasks import get_task
from rlino.tasks.gsm8k import SHIPPED_DIR, GSM8KTask
from rlino.verify.gsm8k import find_answer, format_number, gold_from_solution, parse_number

# (completion, gold, correct, format_ok, extracted)
CASES = [
    # the GSM8K reference format
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", True, True, "18"),
    ("#### 18", "18", True, True, "18"),
    ("####18", "18", True, True, "18"),
    ("#### $1,234.00", "1234", True, True, "1234"),
    ("#### 1,234", "1234", True, True, "1234"),
    ("#### -3", "-3", True, True, "-3"),
    ("#### 18 dollars", "18", True, True, "18"),
    ("#### 9 * 2 = 18", "18", True, True, "18"),
    ("#### 18\n\nQuestion: next one\n#### 99", "18", True, True, "18"),  # first #### wins
    ("#### Step 1: eggs\n16 - 3 - 4 = 9\n#### Step 2\n#### 18", "18", True, True, "18"),
    # <answer> blocks: last complete block, authoritative
    ("<think>9*2</think> <answer>18</answer>", "18", True, True, "18"),
    ("<answer> 18 </answer>", "18", True, True, "18"),
    ("<answer>$18</answer>", "18", True, True, "18"),
    ("<answer>5</answer> wait <answer>7</answer>", "7", True, True, "7"),
    ("<answer>7</answer> no, <answer>5</answer>", "7", False, True, "5"),
    ("<answer>The answer is 42 apples.</answer>", "42", True, True, "42"),
    ("<answer>x = 9 * 2 = 18</answer>", "18", True, True, "18"),
    ("<answer>\\boxed{18}</answer>", "18", True, True, "18"),
    ("<answer>eighteen</answer> 18", "18", False, True, "eighteen"),
    ("#### 18 <answer>17</answer>", "18", False, True, "17"),  # the block beats ####
    ("<answer>18", "18", True, False, "18"),  # unclosed: falls back to the last number
    ("</answer>18<answer>", "18", True, False, "18"),  # tags in the wrong order: no block
    # \boxed
    ("so the total is \\boxed{18}.", "18", True, True, "18"),
    ("\\boxed{17} hmm, actually \\boxed{18}", "18", True, True, "18"),
    ("\\boxed{\\frac{5}{2}}", "2.5", True, True, "2.5"),
    ("\\boxed{\\dfrac{1}{3}}", "1/3", True, True, "1/3"),
    ("\\boxed{5/2}", "2.5", True, True, "2.5"),
    ("\\boxed{\\$1{,}234}", "1234", True, True, "1234"),
    ("\\boxed{18 \\text{ apples}}", "18", True, True, "18"),
    ("\\boxed{x} but 18", "18", True, False, "18"),  # boxed without a number: not a marker
    ("\\boxed{18", "18", True, False, "18"),  # unbalanced brace: not a marker
    # "the answer is"
    ("The answer is 42 apples", "42", True, True, "42"),
    ("the answer is: $1,234.", "1234", True, True, "1234"),
    ("The final answer is **18**.", "18", True, True, "18"),
    ("The answer is 5. Wait, no: the answer is 6.", "6", True, True, "6"),
    ("The answer is -3 degrees", "-3", True, True, "-3"),
    ("the answer is\n18", "18", True, False, "18"),  # nothing on its line: fallback
    # last number
    ("She has 3 + 4 = 7 apples", "7", True, False, "7"),
    ("so 18.", "18", True, False, "18"),
    ("It costs 18.00", "18", True, False, "18"),
    ("It costs $18.50", "18.5", True, False, "18.5"),
    ("The temperature fell to -3", "-3", True, False, "-3"),
    ("The temperature fell to −3", "-3", True, False, "-3"),  # unicode minus
    ("5 - 3", "3", True, False, "3"),  # a binary minus is not a sign
    ("half is 5/2", "2.5", True, False, "2.5"),
    ("0.5 of them", "1/2", True, False, "0.5"),
    ("12,345,678 people", "12345678", True, False, "12345678"),
    ("It is 17, not 18", "17", False, False, "18"),
    ("no numbers here", "18", False, False, None),
    ("", "18", False, False, None),
    ("1" * 60, "1", False, False, None),  # more than 50 digits: not a number
]


@pytest.mark.parametrize(("completion", "gold", "correct", "format_ok", "extracted"), CASES)
def test_extraction_table(
    completion: str, gold: str, correct: bool, format_ok: bool, extracted: str | None
) -> None:
    score = GSM8KTask().score(completion, {"gold": gold})
    assert (score.correct, score.format_ok, score.extracted) == (correct, format_ok, extracted)
    assert score.reward == (1.0 if correct else 0.0)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("18", Fraction(18)),
        ("18.", Fraction(18)),
        ("18.00", Fraction(18)),
        ("$1,234.00", Fraction(1234)),
        ("-3", Fraction(-3)),
        ("-$3", Fraction(-3)),
        ("$-3", Fraction(-3)),
        ("5/2", Fraction(5, 2)),
        ("\\frac{5}{2}", Fraction(5, 2)),
        ("0.125", Fraction(1, 8)),
        ("1,2345", None),
        ("18 apples", None),
        ("5/0", None),
        ("1" * 51, None),
        ("", None),
    ],
)
def test_parse_number(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Fraction(18), "18"),
        (Fraction(-5, 2), "-2.5"),
        (Fraction(1, 8), "0.125"),
        (Fraction(1, 3), "1/3"),
    ],
)
def test_format_number_round_trips(value: Fraction, text: str) -> None:
    assert format_number(value) == text
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("solution", "gold"),
    [
        ("reasoning <<2*3=6>>6\n#### 6", "6"),
        ("#### 1,200", "1200"),
        ("#### -7", "-7"),
        ("42", "42"),
        (42, "42"),
        (2.5, "2.5"),
        ("no answer here", None),
        ("#### none", None),
        (True, None),
        (None, None),
    ],
)
def test_gold_from_solution(solution: object, gold: str | None) -> None:
    assert gold_from_solution(solution) == gold


def test_extraction_rule_names() -> None:
    assert find_answer("<answer>1</answer>").rule == "answer_block"
    assert find_answer("\\boxed{1}").rule == "boxed"
    assert find_answer("#### 1").rule == "hashes"
    assert find_answer("The answer is 1").rule == "answer_is"
    assert find_answer("1").rule == "last_number"
    assert find_answer("none").rule == "none"


def test_gold_is_derived_from_answer_when_missing() -> None:
    task = GSM8KTask()
    assert task.score("#### 1,200", {"answer": "so\n#### 1200"}).correct
    assert not task.score("#### 1200", {"answer": "no number"}).correct


def test_format_bonus_is_added_only_when_marked() -> None:
    task = GSM8KTask(format_bonus=0.1)
    example = {"gold": "18"}
    assert task.score("#### 18", example).reward == pytest.approx(1.1)
    assert task.score("#### 17", example).reward == pytest.approx(0.1)
    assert task.score("so 18", example).reward == 1.0
    assert task.score("so 17", example).reward == 0.0


def test_loads_local_dir_and_keeps_fields(gsm8k_dir: Path) -> None:
    task = get_task("gsm8k", path=str(gsm8k_dir))
    test = task.examples("test")
    assert len(test) == 1319 and len(task.examples("train")) == 7473
    first = test[0]
    assert first["gold"] == "18" and first["answer"].endswith("#### 18")
    assert task.question(first).startswith("Janet")
    assert "Janet" in task.prompt(first, "r1")
    assert task.examples("test") is test  # cached


def test_every_reference_solution_scores_correct(gsm8k_dir: Path) -> None:
    task = GSM8KTask(path=str(gsm8k_dir))
    for split in ("train", "test"):
        examples = task.examples(split)
        assert all(task.score(e["answer"], e).correct for e in examples), split


def test_loads_single_jsonl_file_for_any_split(gsm8k_dir: Path) -> None:
    task = GSM8KTask(path=str(gsm8k_dir / "test.jsonl"))
    assert len(task.examples("train")) == len(task.examples("test")) == 1319


def test_env_var_is_the_default_path(gsm8k_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLINO_GSM8K", str(gsm8k_dir))
    task = GSM8KTask()
    assert task.source() == str(gsm8k_dir)
    assert len(task.examples("test")) == 1319
    monkeypatch.delenv("RLINO_GSM8K")
    assert GSM8KTask().source() == str(SHIPPED_DIR)


# sha256 of the decompressed files, as in openai/grade-school-math (grade_school_math/data/)
SHIPPED_SHA256 = {
    "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}


def test_shipped_copy_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no path (and no $RLINO_GSM8K) the copy in rlino/data/gsm8k is read, offline."""
    monkeypatch.delenv("RLINO_GSM8K", raising=False)
    task = get_task("gsm8k")
    assert task.source() == str(SHIPPED_DIR)
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0]["question"].startswith("Janet’s ducks lay 16 eggs per day")
    assert test[0]["answer"].endswith("#### 18") and test[0]["gold"] == "18"
    assert train[0]["question"].startswith("Natalia sold clips to 48 of her friends in April")
    assert train[0]["gold"] == "72"


@pytest.mark.parametrize("split", ["train", "test"])
def test_shipped_files_are_reproducible_and_unchanged(split: str) -> None:
    """Header with mtime 0 and no file name (a rebuild gives the same bytes); content unchanged."""
    raw = (SHIPPED_DIR / f"{split}.jsonl.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[3] == 0 and raw[4:8] == b"\0\0\0\0"  # FLG, MTIME
    assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == SHIPPED_SHA256[split]
    assert "MIT License" in (SHIPPED_DIR / "LICENSE").read_text()


def test_gzipped_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"question": "q", "answer": "#### 1"})
    (tmp_path / "test.jsonl.gz").write_bytes(gzip.compress(f"{good}\nnot json\n".encode()))
    with pytest.raises(UserError, match=r"test\.jsonl\.gz:2: not valid JSON"):
        GSM8KTask(path=str(tmp_path)).examples("test")
    (tmp_path / "test.jsonl.gz").write_bytes(gzip.compress(f"{good}\n".encode())[:-8])
    with pytest.raises(UserError, match=r"test\.jsonl\.gz: not a readable gzip file"):
        GSM8KTask(path=str(tmp_path)).examples("test")
    (tmp_path / "test.jsonl.gz").write_bytes(b"plain text, not gzip\n")
    with pytest.raises(UserError, match=r"not a readable gzip file"):
        GSM8KTask(path=str(tmp_path / "test.jsonl.gz")).examples("test")


def test_plain_jsonl_shadows_the_gzipped_copy_beside_it(tmp_path: Path) -> None:
    """A decompressed copy next to its archive is read once, not twice."""
    line = json.dumps({"question": "q", "answer": "#### 1"}) + "\n"
    (tmp_path / "test.jsonl.gz").write_bytes(gzip.compress(line.encode()))
    assert len(GSM8KTask(path=str(tmp_path)).examples("test")) == 1
    (tmp_path / "test.jsonl").write_text(line * 2)
    assert len(GSM8KTask(path=str(tmp_path)).examples("test")) == 2


def test_settings_are_json_serialisable() -> None:
    settings = GSM8KTask(path="x", format_bonus=0.5).settings()
    assert json.loads(json.dumps(settings)) == {
        "path": "x",
        "format_bonus": 0.5,
        "extraction": "flexible",
    }


def test_missing_local_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist; --data takes a directory"):
        GSM8KTask(path=str(tmp_path / "nope")).examples("test")
    with pytest.raises(UserError, match=r"no test data"):
        GSM8KTask(path=str(tmp_path)).examples("test")


def test_malformed_local_rows_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "no number"}\n')
    with pytest.raises(UserError, match=r"example 0"):
        GSM8KTask(path=str(tmp_path)).examples("test")
    (tmp_path / "test.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match=r"test.jsonl:1: not valid JSON"):
        GSM8KTask(path=str(tmp_path)).examples("test")


def test_unreachable_hub_is_a_user_error_naming_the_fix() -> None:
    """Offline (forced, so the test is fast): one line naming the dataset id and the fix."""
    code = (
        "from rlino.tasks.gsm8k import GSM8KTask\n"
        "from rlino.errors import UserError\n"
        "try:\n    GSM8KTask(path='openai/gsm8k').examples('test')\n"
        "except UserError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RLINO_GSM8K", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    ).stdout
    assert "could not load Hugging Face dataset 'openai/gsm8k'" in out and "--data takes" in out


RAMBLE = (
    "Janet has 16 eggs. She eats 3 and bakes 4, so 16 - 3 - 4 = 9 are left. She sells them at 2 "
    "each, 9 * 2 = 18. Then 18 + 18 = 36? No wait, let me count again: 16 - 3 - 4 = 9, 9 * 2 = 18"
)


@pytest.mark.parametrize(
    ("completion", "flexible", "strict"),
    [
        (RAMBLE, True, False),  # the last number is the gold answer: only flexible reads it
        ("So she makes 18 dollars", True, False),
        ("The answer is 18", True, False),  # not a template marker
        ("#### 18", True, True),
        ("She makes 9 * 2 = 18.\n#### 18", True, True),
        ("\\boxed{18}", True, True),
        ("so the total is $\\boxed{18}$ dollars", True, True),
        ("<answer>18</answer>", True, True),
        ("<think>9 * 2 = 18</think> <answer> 18 </answer>", True, True),
        (RAMBLE + " <answer>17</answer>", False, False),
        ("<answer>18", True, False),  # cut before the closing tag: no block
        ("#### Step 1\n9 * 2 = 18", True, False),  # a heading, not an answer
        ("", False, False),
    ],
)
def test_strict_extraction_needs_a_marker(completion: str, flexible: bool, strict: bool) -> None:
    example = {"gold": "18"}
    assert GSM8KTask().score(completion, example).correct is flexible
    assert GSM8KTask(extraction="flexible").score(completion, example).correct is flexible
    score = GSM8KTask(extraction="strict").score(completion, example)
    assert score.correct is strict
    assert score.reward == (1.0 if strict else 0.0)
    if not score.format_ok:
        assert score.extracted is None  # strict reads nothing outside a marker


def test_strict_extraction_rules() -> None:
    assert find_answer("The answer is 1", "strict").rule == "none"
    assert find_answer("so 1", "strict").rule == "none"
    assert find_answer("\\boxed{1}", "strict").rule == "boxed"
    assert find_answer("#### 1", "strict").rule == "hashes"
    assert find_answer("<answer>1</answer>", "strict").rule == "answer_block"


def test_extraction_option_via_get_task_and_settings() -> None:
    assert get_task("gsm8k", extraction="strict").settings()["extraction"] == "strict"
    assert GSM8KTask().settings()["extraction"] == "flexible"


@pytest.mark.parametrize("value", ["lenient", "", "STRICT", 1, None])
def test_unknown_extraction_is_a_one_line_user_error(value: object) -> None:
    with pytest.raises(UserError, match="extraction must be one of flexible, strict") as info:
        get_task("gsm8k", extraction=value)
    assert "\n" not in str(info.value)


def test_unknown_extraction_exits_2_on_the_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rlino", "grade", "--task", "gsm8k", "--task-opt", "extraction=x", "-"],
        capture_output=True, text=True, input="", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "extraction" in proc.stderr
