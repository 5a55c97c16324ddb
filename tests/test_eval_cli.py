"""`rlino eval` end to end: the shipped tiny base on Countdown, GSM8K from the shipped copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def rlino(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlino", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
        env=env,
    )


def test_greedy_eval_json_and_saved_completions_regrade(tmp_path: Path) -> None:
    saved = tmp_path / "completions.jsonl"
    proc = rlino("eval", "--task", "countdown", "--limit", "12", "--json", "--save", str(saved))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == 12 and 0.0 <= result["accuracy"] <= 1.0
    assert {"mean_length_correct", "mean_length_wrong", "format_rate"} <= set(result)
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(records) == 12 and all("response" in r and "numbers" in r for r in records)
    truncated = sum(not r["finished"] for r in records) / 12
    assert result["truncated_rate"] == pytest.approx(truncated)
    graded = rlino("grade", "--task", "countdown", str(saved))
    assert graded.returncode == 0, graded.stderr
    regraded = [json.loads(line) for line in graded.stdout.splitlines()]
    assert [r["correct"] for r in regraded] == [r["correct"] for r in records]
    assert sum(r["correct"] for r in records) / 12 == pytest.approx(result["accuracy"])


def test_sampled_eval_reports_pass_at_k() -> None:
    proc = rlino(
        "eval", "--task", "countdown", "--limit", "6", "--samples", "4", "--json", "--seed", "1"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"pass@1", "pass@2", "pass@4", "mean@4"} <= set(result)
    assert result["pass@1"] == pytest.approx(result["mean@4"])
    assert result["pass@1"] <= result["pass@2"] <= result["pass@4"]


def test_truncated_rate_counts_completions_cut_at_max_new_tokens(one_thread: None) -> None:
    """The shipped tiny base ends its first 8 answers after 61-67 tokens (an EOS or `</answer>`)."""
    from rlino.evaluate import evaluate
    from rlino.policy import load_policy
    from rlino.resolve import tiny_model_dir
    from rlino.tasks import get_task

    policy = load_policy(str(tiny_model_dir()), device="cpu", dtype="fp32")
    task = get_task("countdown")
    examples = task.examples("test")[:8]
    for max_new_tokens, rate in [(1, 1.0), (2, 1.0), (64, 0.25), (128, 0.0)]:
        report = evaluate(policy, task, examples, max_new_tokens=max_new_tokens)
        assert report.truncated_rate == rate, max_new_tokens
        assert report.summary()["truncated_rate"] == rate
        cut = [c for c in report.completions if not c.finished]
        assert len(cut) / 8 == rate and all(c.length == max_new_tokens for c in cut)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nosuch"], "unknown task"),
        (["--split", "dev"], "--split must be train or test"),
        (["--model", "/no/such/dir", "--task", "gsm8k"], "does not exist"),
        (["--template", "nosuch", "--limit", "1"], "unknown template"),
    ],
)
def test_bad_eval_input_exits_2(args: list[str], message: str) -> None:
    proc = rlino("eval", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_gsm8k_eval_needs_no_data_option(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    """No --data, no $RLINO_GSM8K, hub forced offline: the shipped GSM8K copy is evaluated."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RLINO_GSM8K", None)
    saved = tmp_path / "completions.jsonl"
    proc = rlino(
        "eval", "--task", "gsm8k", "--model", str(tiny_random_model_dir), "--limit", "4",
        "--max-new-tokens", "8", "--json", "--save", str(saved), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert records[0]["question"].startswith("Janet’s ducks lay 16 eggs per day")
    assert records[0]["gold"] == "18"


@pytest.mark.slow
def test_smollm2_on_16_gsm8k_questions(smollm2_gguf: tuple[Path, str]) -> None:
    directory, name = smollm2_gguf
    proc = rlino(
        "eval", "--model", str(directory), "--gguf-file", name, "--task", "gsm8k",
        "--template", "chat", "--limit", "16",
        "--max-new-tokens", "192", "--batch-size", "16", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == 16 and 0.0 <= result["accuracy"] <= 1.0 and result["mean_length"] > 10
