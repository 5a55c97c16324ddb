"""Run-directory logging: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard.

On resume the rows written after the restored checkpoint are dropped (they belong to the
interrupted run), so a resumed run's log reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file; a torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Keep only rows with `iteration <= last_iteration` (atomic rewrite)."""
    if not path.exists():
        return
    kept = [row for row in read_jsonl(path) if row.get("iteration", 0) <= last_iteration]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(path)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends metric rows to `metrics.jsonl` and (optionally) TensorBoard under `tb/`."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_from: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if resume_from is not None:
            truncate_jsonl(self.path, resume_from)
            truncate_jsonl(self.samples_path, resume_from)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_from + 1 if resume_from is not None else None
            self._writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def log(self, row: dict[str, Any]) -> None:
        """Write one row; numeric entries also go to TensorBoard at step `row["iteration"]`."""
        row = {key: _clean(value) for key, value in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is not None:
            step = int(row["iteration"])
            for key, value in row.items():
                if (
                    key != "iteration"
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    self._writer.add_scalar(key, value, step)

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        """Append example completions to `samples.jsonl`."""
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._writer is not None:
            self._writer.close()
