"""Resumable checkpoints that survive kills, full disks and damaged files.

A checkpoint is a directory `checkpoints/iter_NNNNNN/` holding the model (HF format, safetensors)
in `model/`, the optimiser and scheduler states (and the fp16 loss scaler's, when one is on),
torch's RNG state, `state.json` (the iteration; the data position and the sampling seeds are
functions of it) and `manifest.json` (size and sha256 of every other file). It is written under a
temporary name, flushed to disk, and renamed into place only when complete, so a kill never leaves
a half-written `iter_*`. On resume `latest()` checks every file against the manifest and falls
back to the newest checkpoint that verifies, so bit rot or a truncated copy is caught instead of
loaded. A write error (a full disk) removes the partial directory and stops the run with a
one-line `UserError`, leaving the previous checkpoint intact. The `.pt` states are read with
`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from rlino import optimizers
from rlino.errors import UserError

PREFIX = "iter_"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
REQUIRED = ("state.json", "optimizer.pt", "scheduler.pt", "rng.pt")
"""Files every checkpoint has besides `model/` (scaler.pt is optional)."""

_warned: set[tuple[str, str]] = set()
"""Damage already reported in this process, so a second `latest()` call does not repeat it."""


def checkpoint_dir(run_dir: Path) -> Path:
    """The run's checkpoint folder."""
    return run_dir / "checkpoints"


def save(
    run_dir: Path,
    iteration: int,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler: Any,
    *,
    scaler: torch.amp.GradScaler | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint for `iteration` atomically; keep the newest `keep` checkpoints.

    `save_model(path)` writes the model and tokenizer in HF format into `path`. `optimizer` is
    the optimiser, or its state dict already gathered whole (a sharded run's, rlino.fsdp). A write error
    (disk full, I/O error) raises UserError after removing the partial temporary directory; the
    existing checkpoints are untouched. Checkpoints newer than `iteration` are left over from
    before a resume that fell back past them (damaged, or of a replaced future) and are removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = checkpoint_dir(run_dir)
    name = f"{PREFIX}{iteration:06d}"
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"
    aside = root / f"{TMP_PREFIX}old-{name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f"{TMP_PREFIX}*"):  # from a killed or failed earlier write
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
        save_model(tmp / "model")
        state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        _torch_save(state, tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None and scaler.is_enabled():
            _torch_save(scaler.state_dict(), tmp / "scaler.pt")
        _torch_save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        _write_text(tmp / "state.json", json.dumps({"iteration": iteration}))
        files = _sync_tree(tmp)
        _write_text(tmp / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # a stale copy of this iteration: move it aside, never half-delete it
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():
            with contextlib.suppress(OSError):  # else it is swept with the other leftovers
                os.replace(aside, final)
        if not _is_write_error(err):
            raise
        raise UserError(_write_failure(f"checkpoint {name}", run_dir, err)) from err
    shutil.rmtree(aside, ignore_errors=True)
    _prune(root, iteration, keep)
    return final


def save_final(run_dir: Path, save_model: Callable[[Path], None]) -> Path:
    """Write the finished run's model to `run_dir/final` (a plain HF directory), atomically.

    A write error raises UserError after removing the partial directory; the run's last
    checkpoint is untouched, so `--resume` writes `final/` again.
    """
    final = run_dir / "final"
    tmp = run_dir / ".tmp-final"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(tmp)
        _sync_tree(tmp, digests=False)
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        _fsync_dir(run_dir)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_error(err):
            raise
        raise UserError(_write_failure("the final model", run_dir, err)) from err
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files all verify, or None when the run has no checkpoint.

    Damaged newer checkpoints are skipped with a one-line warning on stderr; when checkpoints
    exist but none verifies, UserError (never a silent restart from scratch). Leftover temporary
    dirs are ignored.
    """
    candidates = _checkpoints(checkpoint_dir(run_dir))
    damaged: list[tuple[Path, str]] = []
    for path in reversed(candidates):
        problem = damage(path)
        if problem is None:
            for bad, why in damaged:
                if (str(bad), why) not in _warned:
                    _warned.add((str(bad), why))
                    print(
                        f"warning: checkpoint {bad.name} is damaged ({why}); "
                        f"resuming from {path.name}",
                        file=sys.stderr,
                    )
            return path
        damaged.append((path, problem))
    if damaged:
        listing = ", ".join(f"{p.name} ({why})" for p, why in damaged)
        raise UserError(
            f"no intact checkpoint in {checkpoint_dir(run_dir)}: {listing}; cannot resume "
            "(start again with another --out)"
        )
    return None


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (missing manifest or file, wrong size, checksum
    mismatch), or None when every file matches its manifest. Sizes are checked before hashing."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        entries = [(rel, int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except FileNotFoundError:
        return f"{MANIFEST} missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} unreadable"
    if any(Path(rel).is_absolute() or ".." in Path(rel).parts for rel, _, _ in entries):
        return f"{MANIFEST} names a file outside the checkpoint"
    missing = [rel for rel in REQUIRED if rel not in files]
    if not any(rel.startswith("model/") for rel in files):
        missing.append("model/")
    if missing:
        return f"{MANIFEST} lacks {', '.join(missing)}"
    for rel, size, _ in entries:
        file = path / rel
        if not file.is_file():
            return f"{rel}: missing"
        if (actual := file.stat().st_size) != size:
            return f"{rel}: {actual} bytes, expected {size}"
    for rel, _, sha in entries:
        try:
            with (path / rel).open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != sha:
                    return f"{rel}: checksum mismatch"
        except OSError as err:
            return f"{rel}: unreadable ({err.strerror or err})"
    return None


def load_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None = None,
    *,
    shard: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """Restore optimiser, scheduler, loss scaler and RNG from checkpoint `path`; return its iteration.

    `weights_only=True`: a checkpoint from elsewhere cannot run code when loaded. `shard` maps the
    whole-tensor optimiser state to a sharded optimiser's (rlino.fsdp).
    """
    try:
        state = torch.load(path / "optimizer.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        if "torchao" not in str(e):
            raise
        raise UserError(
            f"{path} holds 8-bit AdamW state (torchao): pip install torchao, and resume with "
            "--set optim.optimizer=adamw8bit"
        ) from None
    optimizers.check_resumable(state, optimizer, str(path))
    optimizer.load_state_dict(state if shard is None else shard(state))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return int(json.loads((path / "state.json").read_text())["iteration"])


# ---------------------------------------------------------------- helpers


def _checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint dirs (`iter_NNNNNN`), oldest first, by iteration."""
    found = []
    for path in root.glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX) :]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def _prune(root: Path, iteration: int, keep: int) -> None:
    """Remove checkpoints newer than `iteration` and all but the newest `keep` of the rest.

    The one just written (`iteration`) is always among those kept, so the newest good checkpoint
    survives pruning whatever the state of the older ones.
    """
    older = []
    for path in _checkpoints(root):
        if int(path.name[len(PREFIX) :]) > iteration:
            shutil.rmtree(path, ignore_errors=True)
        else:
            older.append(path)
    for path in older[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a write error surfaces as the OSError (errno) that
    caused it instead of only torch's opaque `unexpected pos` RuntimeError."""
    with path.open("wb") as f:
        torch.save(obj, f)


def _write_text(path: Path, text: str) -> None:
    """Write and flush to disk (the manifest is written after the tree was synced)."""
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_tree(root: Path, *, digests: bool = True) -> dict[str, dict[str, Any]]:
    """Flush every file and directory under `root` to disk; with `digests`, return
    {relative path: {size, sha256}}, hashed in chunks while the files are still in the page cache.
    """
    files: dict[str, dict[str, Any]] = {}
    for file in sorted(root.rglob("*")):
        if file.is_file():
            with file.open("rb") as f:
                if digests:
                    sha = hashlib.file_digest(f, "sha256").hexdigest()
                    rel = file.relative_to(root).as_posix()
                    files[rel] = {"size": os.fstat(f.fileno()).st_size, "sha256": sha}
                os.fsync(f.fileno())
    for sub in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)
    return files


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (new files, a rename) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: one in the exception chain (torch's writer raises a
    RuntimeError while handling it), or the one safetensors reports only as text (`I/O error: No
    space left on device (os error 28)`); None for anything else (a bug, not a write error)."""
    for e in _chain(err):
        if isinstance(e, OSError):
            return e
        if isinstance(e, SafetensorError) and "I/O error" in str(e):
            code = re.search(r"\(os error (\d+)\)", str(e))
            number = int(code.group(1)) if code else errno.EIO
            return OSError(number, os.strerror(number))
    return None


def _is_write_error(err: BaseException) -> bool:
    """An I/O failure while writing (disk full, I/O error, permissions), not a bug."""
    return _os_error(err) is not None


def _write_failure(what: str, run_dir: Path, err: BaseException) -> str:
    """The one-line UserError message for a failed write, naming the checkpoint to resume from."""
    oserror = _os_error(err)
    cause = str(oserror) if oserror is not None else str(err).strip().splitlines()[0]
    space = oserror is not None and oserror.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "after freeing space" if space else "once the cause is fixed"
    intact = next(
        (p for p in reversed(_checkpoints(checkpoint_dir(run_dir))) if damage(p) is None), None
    )
    if intact is None:
        after = f"no earlier checkpoint is intact; start the run again {fix}"
    else:
        previous = "the previous checkpoint" if what.startswith("checkpoint") else "checkpoint"
        after = f"{previous} {intact.name} is intact, resume with --resume {run_dir} {fix}"
    return f"could not write {what} in {run_dir}: {cause}; {after}"
