"""Countdown: combine the given numbers with + - * / (each exactly once) to reach the target.

By default the data is generated: every instance is built from a hidden solution over all of its
numbers, with exact integer divisions only, so every instance is solvable without fractions. The
test split is generated first from its own seeded stream and the train split skips every
(sorted numbers, target) pair in it, so the splits are disjoint and the test split does not
depend on `train_size`. With `path`, instances are read instead (JSONL/parquet file or directory,
or a Hugging Face dataset id) in TinyZero's schema (`nums`, `target`) or ours (`numbers`,
`target`); a source without a test split is split by a fixed seeded shuffle.

Scoring reads the last `<answer>` block with the safe parser of `rlino.verify.countdown`:
`correct_reward` when right, `format_reward` when a block is present but wrong, 0 without a block.
Reasoning steps (`step_ends`, for Monte-Carlo step credit) are the equations of the thinking.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
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
from rlino.verify.countdown import check_equation, extract_answer_block

MIN_NUMBERS, MAX_NUMBERS = 2, 6
_EQUATION_END = re.compile(r"=\s*-?\d+(?:\.\d+)?(?:[ \t]*[,.;])?")
"""An equation's result, `= 12`, with a `,` `.` or `;` right after it: where a step ends."""
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


@dataclass(frozen=True)
class _Node:
    """A partial solution: its integer value, its text, and the precedence of its top operator."""

    value: int
    text: str
    precedence: int


def _combine(left: _Node, op: str, right: _Node) -> _Node:
    """`left op right` with only the parentheses that precedence and (non-)associativity require."""
    prec = _PRECEDENCE[op]
    lhs = f"({left.text})" if left.precedence < prec else left.text
    needs = right.precedence < prec or (right.precedence == prec and op in "-/")
    rhs = f"({right.text})" if needs else right.text
    if op == "+":
        value = left.value + right.value
    elif op == "-":
        value = left.value - right.value
    elif op == "*":
        value = left.value * right.value
    else:  # `_allowed_ops` offers "/" only for exact divisions
        value = left.value // right.value
    return _Node(value, f"{lhs} {op} {rhs}", prec)


def _allowed_ops(left: _Node, right: _Node) -> list[str]:
    """Operators that keep every intermediate a positive integer."""
    ops = ["+", "*"]
    if left.value > right.value:
        ops.append("-")
    if right.value > 1 and left.value % right.value == 0:
        ops.append("/")
    return ops


def _check_ranges(num_numbers: int, min_number: int, max_number: int, max_target: int) -> None:
    if not MIN_NUMBERS <= num_numbers <= MAX_NUMBERS:
        raise UserError(
            f"countdown num_numbers must be {MIN_NUMBERS}..{MAX_NUMBERS}, got {num_numbers}"
        )
    if not 1 <= min_number <= max_number:
        raise UserError(
            f"countdown needs 1 <= min_number <= max_number, got {min_number}, {max_number}"
        )
    if max_number >= 10**6:
        raise UserError(f"countdown max_number must be below 1000000, got {max_number}")
    if max_target < 1:
        raise UserError(f"countdown max_target must be >= 1, got {max_target}")


def _instances(
    num_numbers: int, min_number: int, max_number: int, max_target: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """An endless stream of solvable instances (and None for each rejected draw, to bound loops)."""
    while True:
        numbers = [rng.randint(min_number, max_number) for _ in range(num_numbers)]
        nodes = [_Node(v, str(v), _ATOM) for v in numbers]
        while len(nodes) > 1:
            i, j = rng.sample(range(len(nodes)), 2)
            left, right = nodes[i], nodes[j]
            node = _combine(left, rng.choice(_allowed_ops(left, right)), right)
            nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [node]
        if not 1 <= nodes[0].value <= max_target:
            yield None
            continue
        rng.shuffle(numbers)
        yield {"numbers": numbers, "target": nodes[0].value, "solution": nodes[0].text}


def generate_instances(
    n: int,
    num_numbers: int,
    min_number: int,
    max_number: int,
    max_target: int,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """`n` solvable Countdown instances `{"numbers", "target", "solution"}` drawn with `rng`.

    Numbers are drawn uniformly (with repetition) from [min_number, max_number]; a random binary
    tree over all of them with + - * / (only positive results and exact divisions) gives the hidden
    solution and the target, kept when it lies in 1..max_target.
    """
    _check_ranges(num_numbers, min_number, max_number, max_target)
    out: list[dict[str, Any]] = []
    budget = 1000 * n + 1000
    for draw, instance in enumerate(
        _instances(num_numbers, min_number, max_number, max_target, rng)
    ):
        if len(out) >= n:
            break
        if draw >= budget:
            raise UserError(
                f"countdown: cannot find targets within 1..{max_target}; raise max_target"
            )
        if instance is not None:
            out.append(instance)
    return out


def instance_key(example: Example) -> tuple[tuple[int, ...], int]:
    """Identity of an instance for split disjointness: (sorted numbers, target)."""
    return tuple(sorted(example["numbers"])), example["target"]


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"field {name!r} must be an integer, got {value!r}")
    return int(value)


@register_task("countdown")
class CountdownTask(Task):
    """Countdown with generated (default) or loaded instances and the TinyZero reward shape."""

    name = "countdown"

    def __init__(
        self,
        num_numbers: int = 3,
        min_number: int = 1,
        max_number: int = 99,
        max_target: int = 999,
        train_size: int = 20000,
        test_size: int = 500,
        seed: int = 0,
        path: str | None = None,
        correct_reward: float = 1.0,
        format_reward: float = 0.1,
    ) -> None:
        if path is None:
            _check_ranges(num_numbers, min_number, max_number, max_target)
        if train_size < 0 or test_size < 0:
            raise UserError("countdown train_size and test_size must be >= 0")
        self.num_numbers = num_numbers
        self.min_number = min_number
        self.max_number = max_number
        self.max_target = max_target
        self.train_size = train_size
        """Examples in the train split (generated, or a cap on loaded ones)."""
        self.test_size = test_size
        """Examples in the test split (generated, or a cap on loaded ones)."""
        self.seed = seed
        self.path = path
        """None: generate. Else a JSONL/parquet file or directory, or a Hugging Face dataset id."""
        self.correct_reward = float(correct_reward)
        self.format_reward = float(format_reward)
        """Reward for an answer block that is present but wrong (TinyZero: 0.1)."""
        self._splits: dict[str, list[Example]] | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "num_numbers": self.num_numbers,
            "min_number": self.min_number,
            "max_number": self.max_number,
            "max_target": self.max_target,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "seed": self.seed,
            "path": self.path,
            "correct_reward": self.correct_reward,
            "format_reward": self.format_reward,
        }

    def examples(self, split: str) -> list[Example]:
        if split not in ("train", "test"):
            raise UserError(f"countdown has splits 'train' and 'test', not {split!r}")
        if self._splits is None:
            self._splits = self._generate() if self.path is None else self._load(self.path)
        return self._splits[split]

    def question(self, example: Example) -> str:
        numbers = ", ".join(str(n) for n in example["numbers"])
        return (
            f"Using the numbers [{numbers}], create an equation that equals {example['target']}. "
            "You can use basic arithmetic operations (+, -, *, /) and each number can only be "
            "used once."
        )

    def score(self, completion: str, example: Example) -> Score:
        block = extract_answer_block(completion)
        if block is None:
            return Score(correct=False, reward=0.0, extracted=None, format_ok=False)
        correct = check_equation(block, example["numbers"], example["target"])
        reward = self.correct_reward if correct else self.format_reward
        return Score(correct=correct, reward=reward, extracted=block, format_ok=True)

    def step_ends(self, completion: str) -> list[int]:
        """One step per equation of the thinking, the answer block last.

        A step ends after each equation's result (`= 12`, with a `,` `.` or `;` right after it: the
        tiny base writes `3 + 5 = 8, 8 * 2 = 16.` on one line) and at each line end (a model that
        writes one equation per line, or words between them); `</think>` ends one too (the
        decision to stop searching). Nothing inside `<answer>...` splits: the answer is one step.
        """
        answer = completion.find("<answer>")
        head = completion if answer < 0 else completion[:answer]
        ends = [m.end() for m in _EQUATION_END.finditer(head)] + line_ends(head)
        close = head.find("</think>")
        if close >= 0:
            ends.append(close + len("</think>"))
        return tidy_step_ends(completion, ends)

    def example_from_record(self, record: Record) -> Example:
        """An example from a record with `numbers` (or TinyZero's `nums`) and `target`."""
        raw = record.get("numbers", record.get("nums"))
        if raw is None:
            raise ValueError("missing field 'numbers' (or 'nums')")
        if not isinstance(raw, list | tuple) or not raw:
            raise ValueError("field 'numbers' must be a non-empty list of integers")
        if "target" not in record:
            raise ValueError("missing field 'target'")
        example: Example = {
            "numbers": [_as_int(v, "numbers") for v in raw],
            "target": _as_int(record["target"], "target"),
        }
        if isinstance(record.get("solution"), str):
            example["solution"] = record["solution"]
        return example

    def _generate(self) -> dict[str, list[Example]]:
        """Disjoint seeded splits: test first (distinct instances), then train avoiding test."""
        options = (self.num_numbers, self.min_number, self.max_number, self.max_target)
        test: list[Example] = []
        keys: set[tuple[tuple[int, ...], int]] = set()
        stream = _instances(*options, random.Random(f"countdown/test/{self.seed}"))
        budget = 1000 * self.test_size + 10000
        for draw, instance in enumerate(stream):
            if len(test) >= self.test_size:
                break
            if draw >= budget:
                raise UserError(
                    f"countdown: found only {len(test)} distinct test instances for "
                    f"test_size={self.test_size}; widen the number range or lower test_size"
                )
            if instance is not None and instance_key(instance) not in keys:
                keys.add(instance_key(instance))
                test.append(instance)
        train: list[Example] = []
        stream = _instances(*options, random.Random(f"countdown/train/{self.seed}"))
        budget = 1000 * self.train_size + 10000
        for draw, instance in enumerate(stream):
            if len(train) >= self.train_size:
                break
            if draw >= budget:
                raise UserError(
                    "countdown: the test split covers almost every instance; widen the range"
                )
            if instance is not None and instance_key(instance) not in keys:
                train.append(instance)
        return {"train": train, "test": test}

    def _load(self, path: str) -> dict[str, list[Example]]:
        """Read instances; without a test split, split by a fixed seeded shuffle; drop overlaps."""
        splits = self._read(path)
        if splits.get("test"):
            train, test = splits.get("train", []), splits["test"][: self.test_size]
        else:
            records = list(splits.get("train", []))
            random.Random(f"countdown/split/{self.seed}").shuffle(records)
            test, train = records[: self.test_size], records[self.test_size :]
        test_examples = [self._from_source(r, i, path) for i, r in enumerate(test)]
        keys = {instance_key(e) for e in test_examples}
        train_examples = []
        for i, record in enumerate(train):
            if len(train_examples) >= self.train_size:
                break
            example = self._from_source(record, i, path)
            if instance_key(example) not in keys:
                train_examples.append(example)
        return {"train": train_examples, "test": test_examples}

    def _read(self, path: str) -> dict[str, list[Record]]:
        if not is_local(path):
            if path.startswith((".", "/", "~")) or path.endswith(DATA_SUFFIXES):
                raise UserError(f"countdown path {path} does not exist")
            return load_hub(path, None, None)
        local = Path(path).expanduser()
        if local.is_file():
            return {"train": read_file(local)}
        splits = {
            s: [r for f in split_files(local, s) for r in read_file(f)] for s in ("train", "test")
        }
        if not splits["train"] and not splits["test"]:
            raise UserError(f"no train/test JSONL or parquet files in {local}")
        return splits

    def _from_source(self, record: Record, index: int, path: str) -> Example:
        try:
            return self.example_from_record(record)
        except ValueError as e:
            raise UserError(f"countdown example {index} from {path}: {e}") from None
