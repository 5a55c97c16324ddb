"""The task contract: data, prompt and verifier for one verifiable problem family.

A task owns three things and nothing else: where its examples come from (`examples`), how an example
becomes a prompt under a named template (`prompt`), and how a completion is scored (`score`).
Shaped reward and binary success are kept apart in `Score`, so accuracy is never read off a reward.
One optional fourth: where the reasoning steps of a completion end (`step_ends`, one per line by
default), for methods that give each step its own credit (`rlino.vine`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Example = dict[str, Any]


@dataclass(frozen=True)
class Score:
    """The verdict on one completion."""

    correct: bool
    """Binary success: the extracted answer is right. Accuracy and pass@k are computed from this."""
    reward: float
    """The (possibly shaped) training reward, e.g. Countdown's 0.1 for a wrong but present answer."""
    extracted: str | None
    """What was read as the answer, as text; None when no answer could be found."""
    format_ok: bool
    """The completion has the answer in the template's expected place (e.g. an `<answer>` block)."""


class Task(ABC):
    """A verifiable task. Subclasses set `name` and implement the three methods below."""

    name: str = ""
    default_template: str = "r1"

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """The examples of `split` ("train" or "test"), in a fixed, reproducible order."""

    @abstractmethod
    def question(self, example: Example) -> str:
        """The user's question for `example`, without any template around it."""

    @abstractmethod
    def score(self, completion: str, example: Example) -> Score:
        """Score a model completion against `example`. Never raises on any string."""

    def prompt(self, example: Example, template: str | None = None, tokenizer: Any = None) -> str:
        """The full prompt text for `example` under `template` (default: the task's default)."""
        from rlino.tasks.templates import render

        return render(template or self.default_template, self, example, tokenizer)

    def stop_strings(self, template: str | None = None) -> tuple[str, ...]:
        """Strings after which generation can stop: the answer is complete."""
        from rlino.tasks.templates import get_template

        return get_template(template or self.default_template).stop

    def settings(self) -> dict[str, Any]:
        """The options this task was built with; recorded in run dirs and model dirs."""
        return {}

    def step_ends(self, completion: str) -> list[int]:
        """Where the reasoning steps of `completion` end, as character offsets, increasing.

        Step t is `completion[ends[t-1]:ends[t]]`; the completion's own end closes the last step
        and is not listed, so an empty list means one step. Monte-Carlo step credit (`rlino.vine`)
        estimates a value at each of these points. Default: one step per line (VinePPO's split of
        math solutions), a blank line joining the step before it. Never raises, stays linear.
        """
        return tidy_step_ends(completion, line_ends(completion))


_NEWLINE = re.compile(r"\n")


def line_ends(text: str) -> list[int]:
    """The offsets just after each newline of `text`: where its lines end."""
    return [m.end() for m in _NEWLINE.finditer(text)]


def tidy_step_ends(text: str, ends: Iterable[int]) -> list[int]:
    """Candidate step ends cleaned into what `Task.step_ends` returns.

    Sorted and distinct, strictly inside the text (0 and len(text) are no boundaries), and no step
    of whitespace only: a blank stretch joins the step before it (an equation's end and the newline
    right after it make one boundary, after the newline), leading blank text joins the first step
    and trailing blank text the last one.
    """
    out: list[int] = []
    for end in sorted(set(ends)):
        if not 0 < end < len(text):
            continue
        if text[out[-1] if out else 0 : end].strip():
            out.append(end)
        elif out:  # a whitespace-only step: the previous step takes it
            out[-1] = end
    while out and not text[out[-1] :].strip():
        out.pop()
    return out
