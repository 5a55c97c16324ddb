"""Resumable checkpoints, written so that a kill at any moment never leaves a half-written one.

A checkpoint is a directory `checkpoints/iter_NNNNNN/` holding the model (HF format), the optimiser
and scheduler states (and the fp16 loss scaler's, when one is on), torch's RNG state and
`state.json` (the iteration; the data position and the sampling seeds are functions of it). It is written under a temporary name and renamed into place
only when complete, so `latest()` sees either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

PREFIX = "iter_"
TMP_PREFIX = ".tmp-"


def checkpoint_dir(run_dir: Path) -> Path:
    """The run's checkpoint folder."""
    return run_dir / "checkpoints"


def save(
    run_dir: Path,
    iteration: int,
    save_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    scaler: torch.amp.GradScaler | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint for `iteration` atomically; keep the newest `keep` checkpoints.

    `save_model(path)` writes the model and tokenizer in HF format into `path`.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{iteration:06d}"
    tmp = root / f"{TMP_PREFIX}{PREFIX}{iteration:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None and scaler.is_enabled():
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration}))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_final(run_dir: Path, save_model: Any) -> Path:
    """Write the finished run's model to `run_dir/final` (a plain HF directory), atomically."""
    final = run_dir / "final"
    tmp = run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk before the rename makes the checkpoint visible."""
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as f:
                os.fsync(f.fileno())


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None. Leftover temporary dirs are ignored."""
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Restore optimiser, scheduler, loss scaler and RNG from checkpoint `path`; return its iteration."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=False)["torch"])
    return int(json.loads((path / "state.json").read_text())["iteration"])
