"""`rlino grade` as a user runs it: a subprocess on JSONL files and stdin."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlino.tasks.countdown import generate_instances


def grade(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlino", "grade", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_every_gsm8k_test_reference_grades_correct(gsm8k_dir: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").open()]
    path = tmp_path / "refs.jsonl"
    path.write_text(jsonl([{**r, "response": r["answer"]} for r in rows]))
    result = grade("--task", "gsm8k", str(path))
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == len(rows) == 1319
    assert sum(r["correct"] for r in out) == 1319
    assert [r["question"] for r in out] == [r["question"] for r in rows]  # same order, fields kept
    assert out[0]["extracted"] == "18" and out[0]["reward"] == 1.0
    assert "graded 1319 records: accuracy 1.0000" in result.stderr


def test_gsm8k_bare_number_answers_and_wrong_responses(tmp_path: Path) -> None:
    records = [
        {"response": "so \\boxed{2.5}", "answer": "5/2"},
        {"response": "#### 17", "answer": 18},
        {"response": "nothing", "answer": "#### 3"},
    ]
    result = grade("--task", "gsm8k", "-", stdin=jsonl(records))
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["correct"] for r in out] == [True, False, False]
    assert [r["extracted"] for r in out] == ["2.5", "17", None]
    assert "accuracy 0.3333 (1 correct)" in result.stderr


def test_countdown_generated_solutions_grade_correct() -> None:
    instances = generate_instances(200, 4, 1, 99, 999, random.Random(5))
    records = [
        {"response": f"<think>...</think><answer>{inst['solution']}</answer>", **inst}
        for inst in instances
    ]
    records[0] = {"nums": records[0].pop("numbers"), **records[0]}  # TinyZero's field name
    records.append({"response": "<answer>1 + 1</answer>", "numbers": [1, 2], "target": 3})
    records.append({"response": "no block", "numbers": [1, 2], "target": 3})
    result = grade("--task", "countdown", "-", stdin=jsonl(records))
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["correct"] and r["reward"] == 1.0 for r in out[:200])
    assert (out[200]["correct"], out[200]["reward"], out[200]["extracted"]) == (False, 0.1, "1 + 1")
    assert (out[201]["correct"], out[201]["reward"], out[201]["extracted"]) == (False, 0.0, None)


def test_task_options_change_rewards() -> None:
    record = {"response": "<answer>1 + 1</answer>", "numbers": [1, 2], "target": 3}
    result = grade(
        "--task", "countdown", "--task-opt", "format_reward=0.25", "-", stdin=jsonl([record])
    )
    assert json.loads(result.stdout)["reward"] == 0.25


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("this is not json", "not valid JSON"),
        ('{"response": "#### 1"}', "missing field 'answer'"),
        ('{"answer": "#### 1"}', "missing field 'response'"),
        ('{"response": "#### 1", "answer": "no number"}', "no '#### N'"),
        ("[1, 2]", "expected a JSON object"),
        ("", "empty line"),
    ],
)
def test_bad_line_exits_2_naming_the_line(bad_line: str, reason: str) -> None:
    good = json.dumps({"response": "#### 1", "answer": "#### 1"})
    result = grade("--task", "gsm8k", "-", stdin=f"{good}\n{good}\n{bad_line}\n{good}\n")
    assert result.returncode == 2
    assert result.stderr.startswith("error: line 3: ") and reason in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_countdown_missing_target_names_the_line() -> None:
    result = grade("--task", "countdown", "-", stdin=jsonl([{"response": "x", "numbers": [1]}]))
    assert result.returncode == 2 and "line 1: missing field 'target'" in result.stderr


def test_skip_bad_skips_and_reports(tmp_path: Path) -> None:
    good = json.dumps({"response": "#### 1", "answer": "#### 1"})
    path = tmp_path / "mixed.jsonl"
    path.write_text(f"{good}\nnot json\n{good}\n{{}}\n")
    result = grade("--task", "gsm8k", "--skip-bad", str(path))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert "graded 2 records" in result.stderr and "skipped 2 bad lines: 2, 4" in result.stderr


def test_user_errors_for_unknown_task_and_missing_file(tmp_path: Path) -> None:
    result = grade("--task", "nope", "-", stdin="")
    assert result.returncode == 2 and "unknown task 'nope'" in result.stderr
    result = grade("--task", "gsm8k", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2 and result.stderr.startswith("error:")


def test_grade_imports_no_torch_or_transformers() -> None:
    """The grading path must stay light: check what `python -X importtime` saw being imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rlino", "grade", "--task", "countdown", "-"],
        input=jsonl([{"response": "<answer>1 + 2</answer>", "numbers": [1, 2], "target": 3}]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if "|" in line
    }
    assert "rlino" in imported
    assert not imported & {"torch", "transformers", "datasets", "numpy"}
