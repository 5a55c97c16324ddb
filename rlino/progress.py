"""The training loop's terminal side: a progress bar with the run's key numbers, and Ctrl-C handling.

First Ctrl-C: finish the current iteration, checkpoint, exit (exit code 130 from the CLI).
Second Ctrl-C: abort at once. Kept out of the loop so the loop reads as the algorithm.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class GracefulStop:
    """First Ctrl-C: finish the current iteration, checkpoint, exit. Second: abort at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        """Catch SIGINT while inside (a no-op off the main thread, where signals can't be set)."""

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class TrainBar:
    """A rich progress bar showing reward, accuracy, length and the last eval accuracy."""

    def __init__(self, progress: Any, task_id: Any):
        self.progress, self.task_id = progress, task_id
        self.eval_acc: float | None = None

    def advance(self, row: dict[str, Any]) -> None:
        """One iteration done; `row` is its metrics row."""
        if self.progress is None:
            return
        if row.get("eval/accuracy") is not None:
            self.eval_acc = row["eval/accuracy"]
        eval_text = f"{self.eval_acc:.3f}" if self.eval_acc is not None else "-"
        self.progress.update(
            self.task_id,
            advance=1,
            info=(
                f"reward {row['train/reward_mean']:.3f} acc {row['train/accuracy']:.3f} "
                f"len {row['train/length_mean']:.0f} eval {eval_text}"
            ),
        )


@contextmanager
def train_bar(enabled: bool, total: int, done: int) -> Iterator[TrainBar]:
    """A `TrainBar` at `done` of `total` iterations; a silent one when not `enabled`."""
    if not enabled:
        yield TrainBar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ) as progress:
        task_id = progress.add_task("train", total=total, completed=done, info="")
        yield TrainBar(progress, task_id)
