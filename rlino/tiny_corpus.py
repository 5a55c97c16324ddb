"""Synthetic Countdown reasoning traces that teach the tiny base model *how to answer*, not to be right.

A trace is the completion after the r1 prompt's `<think>`: a few *tries*, each a chain of steps
`a op b = v` that combines all numbers into one value, then `</think> <answer> EXPR </answer>`:

    <think> 3 + 5 = 8, 8 * 2 = 16. 5 - 2 = 3, 3 * 3 = 9.</think> <answer> (3 + 5) * 2 </answer>

Arithmetic in the traces is always right; the *policy* in them is deliberately sloppy, so that the
pretrained model behaves like a base model that post-training can improve:

- a try hits the target only some of the time (`hit`); other tries are near misses, drawn with a
  preference for values close to the target (`closeness`), so guessing well is learnable;
- after a hit, the search stops only with probability `stop_on_hit` (else it goes on), and
  without a hit it gives up after each try with probability `give_up`, so thinking length varies;
- the answer copies the hitting try only with probability `pick_hit`, else the last try.

The RL signal is then short and learnable ("answer with the try whose value is the target",
"stop when you hit it", "keep trying until you do"), and every trace is well-formed. The same
knobs (with the number of pretraining steps) make bases of other strengths: `rlino.tiny_bases`
names a few, and `rlino pretrain --style hit=0.5` sets them directly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

MAX_VALUE = 999
"""Largest intermediate value a trace writes (every number up to it is one token)."""


@dataclass(frozen=True)
class Step:
    """One arithmetic step `left op right = value` (integers, value within 0..MAX_VALUE)."""

    left: int
    op: str
    right: int
    value: int

    def text(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.value}"


@dataclass(frozen=True)
class Try:
    """A chain of steps that uses every number once, and the expression it amounts to."""

    steps: tuple[Step, ...]
    expr: str

    @property
    def value(self) -> int:
        return self.steps[-1].value

    def text(self) -> str:
        return ", ".join(step.text() for step in self.steps) + "."


@dataclass(frozen=True)
class TraceStyle:
    """How sloppy the traced policy is (see the module docstring)."""

    hit: float = 0.3
    """Chance that a try is drawn among the hitting chains (when the instance has one left)."""
    closeness: float = 0.25
    """Misses are weighted exp(-|value - target| / (closeness * target + 1)): smaller = nearer."""
    stop_on_hit: float = 0.5
    """Chance to close the thinking right after a hit (else one or two more tries follow)."""
    give_up: float = 0.25
    """Chance to close the thinking after a try that missed."""
    pick_hit: float = 0.5
    """Chance that the answer is the hitting try when the thinking holds one (else the last try)."""
    max_tries: int = 4
    """Most tries in one trace."""


def _combine(a: int, b: int) -> list[tuple[int, str, int, int]]:
    """Every step (left, op, right, value) on two values that stays a whole number in range."""
    out = [(a, "+", b, a + b), (max(a, b), "-", min(a, b), abs(a - b)), (a, "*", b, a * b)]
    for x, y in ((a, b), (b, a)):
        if y != 0 and x % y == 0:
            out.append((x, "/", y, x // y))
    seen: set[tuple[int, str, int]] = set()
    steps = []
    for left, op, right, value in out:
        key = (min(left, right), op, max(left, right)) if op in "+*" else (left, op, right)
        if value <= MAX_VALUE and key not in seen:
            seen.add(key)
            steps.append((left, op, right, value))
    return steps


def all_tries(numbers: Sequence[int]) -> list[Try]:
    """Every way to combine all `numbers` pairwise into one value, in a fixed order.

    Three numbers give about a hundred tries; duplicates (same steps) are removed.
    """
    tries: dict[tuple[Step, ...], Try] = {}

    def walk(items: list[tuple[int, str]], steps: tuple[Step, ...]) -> None:
        if len(items) == 1:
            tries.setdefault(steps, Try(steps, items[0][1]))
            return
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (a, ea), (b, eb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                for left, op, right, value in _combine(a, b):
                    el, er = (ea, eb) if (left, right) == (a, b) else (eb, ea)
                    expr = f"{_paren(el)} {op} {_paren(er)}"
                    walk([(value, expr), *rest], (*steps, Step(left, op, right, value)))

    walk([(n, str(n)) for n in numbers], ())
    return list(tries.values())


def _paren(expr: str) -> str:
    return f"({expr})" if " " in expr else expr


def trace(numbers: Sequence[int], target: int, rng: random.Random, style: TraceStyle) -> str:
    """One completion (without the prompt's `<think>` and without EOS) for an instance."""
    candidates = all_tries(numbers)
    hits = [t for t in candidates if t.value == target]
    misses = [t for t in candidates if t.value != target]
    scale = style.closeness * target + 1.0
    weights = [2.718281828 ** (-abs(t.value - target) / scale) for t in misses]

    chosen: list[Try] = []
    hit_at: int | None = None
    while len(chosen) < style.max_tries:
        if hits and hit_at is None and rng.random() < style.hit:
            pick = rng.choice(hits)
            hit_at = len(chosen)
        else:
            pool = [(t, w) for t, w in zip(misses, weights, strict=True) if t not in chosen]
            if not pool:
                break
            pick = rng.choices([t for t, _ in pool], weights=[w for _, w in pool])[0]
        chosen.append(pick)
        if pick.value == target:
            if rng.random() < style.stop_on_hit:
                break
        elif rng.random() < style.give_up:
            break
    picks_hit = hit_at is not None and rng.random() < style.pick_hit
    answer = chosen[hit_at] if picks_hit else chosen[-1]
    think = " ".join(t.text() for t in chosen)
    return f" {think}</think> <answer> {answer.expr} </answer>"
