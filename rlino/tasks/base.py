"""The task contract: data, prompt and verifier for one verifiable problem family.

A task owns three things and nothing else: where its examples come from (`examples`), how an example
becomes a prompt under a named template (`prompt`), and how a completion is scored (`score`).
Shaped reward and binary success are kept apart in `Score`, so accuracy is never read off a reward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
