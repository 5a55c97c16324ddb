"""`rlino grade`: score JSONL records of model responses with a task's verifier, without any model.

Each input line is a JSON object with a `response` and the fields the task needs to rebuild its
example (GSM8K: `answer`; Countdown: `numbers`/`nums` and `target`). Each output line is the same
object with `correct`, `reward` and `extracted` added, in input order. Only the task's verifier is
imported (no torch, no transformers, no dataset load), so grading runs at tens of thousands of
records per second.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from rlino.errors import UserError
from rlino.tasks.base import Example, Task

MAX_BAD_LINES_LISTED = 20


@dataclass
class GradeSummary:
    """Counts over one graded stream."""

    count: int = 0
    correct: int = 0
    reward_sum: float = 0.0
    bad_lines: list[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    def describe(self) -> str:
        """One human-readable line, e.g. for stderr."""
        text = (
            f"graded {self.count} records: accuracy {self.accuracy:.4f} ({self.correct} correct), "
            f"mean reward {self.reward_sum / self.count if self.count else 0.0:.4f}"
        )
        if self.bad_lines:
            listed = ", ".join(str(n) for n in self.bad_lines[:MAX_BAD_LINES_LISTED])
            more = " ..." if len(self.bad_lines) > MAX_BAD_LINES_LISTED else ""
            text += f"; skipped {len(self.bad_lines)} bad lines: {listed}{more}"
        return text


def record_to_example(task: Task, record: dict[str, Any]) -> Example:
    """The task's example for a graded record (`example_from_record` if the task has one)."""
    convert = getattr(task, "example_from_record", None)
    return convert(record) if convert is not None else record


def grade_line(task: Task, line: bytes) -> dict[str, Any]:
    """Parse, score and annotate one JSONL line; ValueError (with a short reason) if malformed."""
    if not line.strip():
        raise ValueError("empty line")
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    response = record.get("response")
    if not isinstance(response, str):
        raise ValueError("missing field 'response' (a string)")
    try:
        example = record_to_example(task, record)
    except KeyError as e:
        raise ValueError(f"missing field {e}") from None
    except TypeError as e:
        raise ValueError(f"bad record ({e})") from None
    score = task.score(response, example)
    record["correct"] = score.correct
    record["reward"] = score.reward
    record["extracted"] = score.extracted
    return record


def grade_stream(
    task: Task, lines: Iterable[bytes], out: IO[bytes], skip_bad: bool = False
) -> GradeSummary:
    """Grade every line of `lines` into `out`; a malformed line is a UserError unless `skip_bad`."""
    summary = GradeSummary()
    for lineno, line in enumerate(lines, 1):
        try:
            record = grade_line(task, line)
        except ValueError as e:
            if not skip_bad:
                raise UserError(f"line {lineno}: {e} (use --skip-bad to skip such lines)") from None
            summary.bad_lines.append(lineno)
            continue
        out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        summary.count += 1
        summary.correct += bool(record["correct"])
        summary.reward_sum += float(record["reward"])
    return summary
