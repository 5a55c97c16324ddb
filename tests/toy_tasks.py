"""Toy user tasks for tests: a random character model gets a mix of right and wrong samples.

`letter_task` builds a task that is right when the completion contains a given letter, so every
method has a signal on an untrained model; with the letter as its stop string, right answers end
at their first hit and lengths vary. Each test module registers its own name, so modules stay
independent of one another's registrations.
"""

from __future__ import annotations

from rlino.tasks import Example, Score, Task, register_task


def letter_task(
    name: str,
    letter: str,
    *,
    train: int,
    test: int,
    stop_at_letter: bool = False,
    question: str = "say something",
) -> type[Task]:
    """Register and return task `name`: correct (reward 1) iff the completion contains `letter`.

    `train` / `test` examples ("<question> <i>"); `stop_at_letter` makes the letter the only stop
    string (otherwise the template's stop strings apply).
    """

    class ContainsLetter(Task):
        default_template = "plain"

        def examples(self, split: str) -> list[Example]:
            return [{"q": f"{question} {i}"} for i in range(train if split == "train" else test)]

        def question(self, example: Example) -> str:
            return example["q"]

        def score(self, completion: str, example: Example) -> Score:
            hit = letter in completion
            return Score(correct=hit, reward=float(hit), extracted=None, format_ok=True)

        def stop_strings(self, template: str | None = None) -> tuple[str, ...]:
            return (letter,) if stop_at_letter else super().stop_strings(template)

    ContainsLetter.name = name
    ContainsLetter.__name__ = ContainsLetter.__qualname__ = f"Contains_{letter}_{name}"
    return register_task(name)(ContainsLetter)
