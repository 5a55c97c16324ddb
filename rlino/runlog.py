"""Run-directory logging: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard.

Written to survive a kill at any moment. Each append is one write() of whole lines to a file
opened for appending, so a kill leaves at most a torn last line. The loop writes an iteration's
rows before the checkpoint that covers them, and `sync()` puts them on disk first, so no
checkpoint exists without its rows. On resume `repair_jsonl` keeps exactly the rows up to the
restored checkpoint (dropping a torn line and the interrupted run's later rows) and TensorBoard
purges its later steps, so a resumed run's logs read exactly like an uninterrupted one's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rlino import faults


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


def repair_jsonl(path: Path, keep_through: int) -> None:
    """Keep the complete rows with `iteration <= keep_through`, byte for byte; drop the rest.

    Torn lines (no newline, or not JSON) go too. The file is rewritten atomically, and only when
    something is dropped; -1 keeps nothing.
    """
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if _keep(line, keep_through)]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _keep(line: bytes, keep_through: int) -> bool:
    if not line.endswith(b"\n"):
        return False  # the write of this line never finished
    try:
        row = json.loads(line)
    except ValueError:
        return False
    iteration = row.get("iteration") if isinstance(row, dict) else None
    return isinstance(iteration, int) and iteration <= keep_through


def _append(path: Path, text: str, iteration: int) -> None:
    """Append whole lines in one write (looping only on a short write): a kill tears at most the
    last line. `RLINO_FAULT=<file stem>:N` tears it on purpose (see rlino.faults)."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if faults.armed(path.stem, iteration):
            os.write(fd, data[: len(data) // 2])
            faults.kill()
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends metric rows to `metrics.jsonl` and (optionally) TensorBoard under `tb/`."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_from: int | None = None):
        """`resume_from`: the iteration of the checkpoint the run restarts from; later rows are
        dropped. None: the run starts at iteration 0, and any rows an earlier start left (killed
        before its first checkpoint) are dropped, so iteration 0 is never logged twice."""
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        keep_through = -1 if resume_from is None else resume_from
        for path in (self.path, self.samples_path):
            repair_jsonl(path, keep_through)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb = run_dir / "tb"
            purge = keep_through + 1 if tb.exists() else None  # hide the dropped rows' steps
            self._writer = SummaryWriter(str(tb), purge_step=purge)

    def log(self, row: dict[str, Any]) -> None:
        """Write one row; numeric entries also go to TensorBoard at step `row["iteration"]`."""
        row = {key: _clean(value) for key, value in row.items()}
        step = int(row["iteration"])
        _append(self.path, json.dumps(row) + "\n", step)
        if self._writer is not None:
            for key, value in row.items():
                if (
                    key != "iteration"
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    self._writer.add_scalar(key, value, step)

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        """Append example completions (rows of one iteration) to `samples.jsonl`."""
        if rows:
            text = "".join(json.dumps(row) + "\n" for row in rows)
            _append(self.samples_path, text, int(rows[0]["iteration"]))

    def sync(self) -> None:
        """Put every row written so far on disk, TensorBoard's too: called before a checkpoint,
        so that a checkpoint never outlives (a kill, a power cut) the rows it covers."""
        for path in (self.path, self.samples_path):
            if path.exists():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._writer is not None:
            self._writer.close()
