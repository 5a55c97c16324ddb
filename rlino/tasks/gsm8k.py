"""GSM8K: grade-school math word problems with a numeric answer after `####`.

Data comes from the copy shipped in `rlino/data/gsm8k/` (MIT, from openai/grade-school-math;
7473 train and 1319 test problems, gzipped JSONL) unless a `path` is given: a local directory
(`train.jsonl`, `test.jsonl`, optionally `.gz`; fields `question`/`answer`), a single JSONL file
(used for every split), or a Hugging Face dataset id (`openai/gsm8k`, config `main`).
Nothing is read until `examples()` is called, so scoring (e.g. `rlino grade`) never touches data.
The verifier is `rlino.verify.gsm8k`: extraction rules and number normalisation are listed there.
Option `extraction`: `flexible` (default; falls back to "the answer is" and the last number) or
`strict` (only an `<answer>` block, `\\boxed{}` or `####` counts, as the paper's verifier).
Reasoning steps (`step_ends`, for Monte-Carlo step credit) are the lines of the solution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlino.errors import UserError
from rlino.tasks import register_task
from rlino.tasks.base import Example, Score, Task, line_ends, tidy_step_ends
from rlino.tasks.records import (
    DATA_SUFFIXES,
    Record,
    is_local,
    load_hub,
    read_file,
    split_files,
)
from rlino.verify.gsm8k import (
    EXTRACTIONS,
    answers_equal,
    find_answer,
    format_number,
    gold_from_solution,
)

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "gsm8k"
"""The GSM8K copy shipped with rlino: train.jsonl.gz, test.jsonl.gz, LICENSE."""
HUB_DATASET = "openai/gsm8k"
ENV_VAR = "RLINO_GSM8K"
_HOW_TO_FIX = (
    "--data takes a directory with train.jsonl/test.jsonl (optionally .gz), a JSONL file or a "
    f"Hugging Face dataset id such as {HUB_DATASET}; without it (or ${ENV_VAR}) rlino's own "
    "copy is used"
)


@register_task("gsm8k")
class GSM8KTask(Task):
    """GSM8K with exact numeric grading: reward 1 if correct, plus `format_bonus` if marked."""

    name = "gsm8k"

    def __init__(
        self, path: str | None = None, format_bonus: float = 0.0, extraction: str = "flexible"
    ) -> None:
        if extraction not in EXTRACTIONS:
            raise UserError(
                f"gsm8k extraction must be one of {', '.join(EXTRACTIONS)}, got {extraction!r}"
            )
        self.path = path
        """Local dir / JSONL file / HF dataset id; None: $RLINO_GSM8K, else the shipped copy."""
        self.format_bonus = float(format_bonus)
        """Added to the reward when the answer is marked (answer block, boxed, ####, answer is)."""
        self.extraction = extraction
        """flexible: any marker, else the last number; strict: only <answer>, \\boxed{} or ####."""
        self._cache: dict[str, list[Example]] = {}

    def settings(self) -> dict[str, Any]:
        return {"path": self.path, "format_bonus": self.format_bonus, "extraction": self.extraction}

    def source(self) -> str:
        """Where examples come from: the `path` option, else $RLINO_GSM8K, else the shipped copy."""
        return self.path or os.environ.get(ENV_VAR) or str(SHIPPED_DIR)

    def examples(self, split: str) -> list[Example]:
        if split not in self._cache:
            records = self._load(split)
            self._cache[split] = [self._from_source(r, i, split) for i, r in enumerate(records)]
        return self._cache[split]

    def question(self, example: Example) -> str:
        return str(example["question"])

    def score(self, completion: str, example: Example) -> Score:
        found = find_answer(completion, self.extraction)
        gold = example.get("gold") or gold_from_solution(example.get("answer")) or ""
        correct = answers_equal(found.value, gold)
        reward = (1.0 if correct else 0.0) + (self.format_bonus if found.format_ok else 0.0)
        extracted = format_number(found.value) if found.value is not None else found.text
        return Score(correct=correct, reward=reward, extracted=extracted, format_ok=found.format_ok)

    def step_ends(self, completion: str) -> list[int]:
        """One step per line of the solution; the final answer's line and anything after it
        (e.g. the `Question:` where the plain template stops) are one last step.

        The answer line starts at the first `####` or `<answer>`: once it is written the outcome
        is settled, and a value estimate past it would cost samples and say nothing.
        """
        marks = [i for i in (completion.find("####"), completion.find("<answer>")) if i >= 0]
        answer = min(marks, default=len(completion))
        return tidy_step_ends(completion, [e for e in line_ends(completion) if e <= answer])

    def example_from_record(self, record: Record) -> Example:
        """An example from a graded record: needs `answer` (`... #### N` or a bare number)."""
        if "answer" not in record:
            raise ValueError("missing field 'answer'")
        gold = gold_from_solution(record["answer"])
        if gold is None:
            raise ValueError("field 'answer' has no '#### N' and is not a number")
        return {"question": record.get("question", ""), "answer": record["answer"], "gold": gold}

    def _from_source(self, record: Record, index: int, split: str) -> Example:
        """Keep `question` and `answer`, add the normalised `gold`; bad rows are a UserError."""
        try:
            example = self.example_from_record(record)
        except ValueError as e:
            raise UserError(f"GSM8K {split} example {index} from {self.source()}: {e}") from None
        if "question" not in record:
            raise UserError(f"GSM8K {split} example {index} from {self.source()}: no 'question'")
        return example

    def _load(self, split: str) -> list[Record]:
        source = self.source()
        if source == str(SHIPPED_DIR) and not split_files(SHIPPED_DIR, split):
            raise UserError(
                f"the GSM8K copy shipped with rlino is missing from {SHIPPED_DIR}; {_HOW_TO_FIX}"
            )
        if is_local(source):
            path = Path(source).expanduser()
            if path.is_file():
                return read_file(path)
            files = split_files(path, split)
            if not files:
                raise UserError(f"no {split} data (e.g. {split}.jsonl) in {path}; {_HOW_TO_FIX}")
            return [r for f in files for r in read_file(f)]
        if source.startswith((".", "/", "~")) or source.endswith(DATA_SUFFIXES):
            raise UserError(f"GSM8K path {source} does not exist; {_HOW_TO_FIX}")
        try:
            return load_hub(source, "main" if source.endswith("gsm8k") else None, split)[split]
        except UserError as e:
            raise UserError(f"{e}; {_HOW_TO_FIX}") from None
