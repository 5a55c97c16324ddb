"""Which model and which task a command means, from plain arguments.

Every command that loads a policy for a task (train, eval, analyze equivalence, the demo, the
benchmarks) resolves it here, so they agree on the defaults:

- no model on the Countdown task means the built-in tiny base (`rlino/assets/tiny-countdown`);
- a model directory that records the task it was pretrained for (`rlino_task.json`, written by
  `rlino pretrain`) supplies the task options and template the user did not set;
- the task name is checked against the registry before anything is loaded.

Nothing here loads weights or data, so a user mistake is reported before any slow work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlino.errors import UserError

TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-countdown"
"""The shipped tiny Countdown base (rebuilt by `rlino pretrain --task countdown --seed 0`)."""

TASK_FILE = "rlino_task.json"
"""File beside a model's weights recording the task, template and options it was trained for."""


@dataclass(frozen=True)
class Target:
    """A resolved (model, task) pair: what to load and how to prompt it."""

    model_path: str
    """HF model dir, hub id or .gguf file"""
    gguf_file: str | None
    """GGUF file name inside `model_path`, when that is a directory of GGUF files"""
    task: str
    """registered task name"""
    task_options: dict[str, Any] = field(default_factory=dict)
    """task options: the user's, over the model's recorded ones"""
    template: str | None = None
    """prompt template: the user's, else the model's recorded one, else None (the task's default)"""


def task_settings(model_dir: str | Path) -> dict[str, Any] | None:
    """The `{"task", "template", "options"}` a model dir records (`rlino_task.json`), or None."""
    path = Path(model_dir) / TASK_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "task" not in data:
        raise UserError(f"{path} lacks a 'task' entry")
    return data


def tiny_model_dir() -> Path:
    """The shipped tiny Countdown base; a clear error if the package was installed without it."""
    if not (TINY_MODEL_DIR / "config.json").is_file():
        raise UserError(
            f"the built-in tiny model is missing from {TINY_MODEL_DIR}; rebuild it with "
            f"`rlino pretrain --task countdown --out {TINY_MODEL_DIR} --seed 0`"
        )
    return TINY_MODEL_DIR


def path_exists(spec: str | Path) -> bool:
    """`Path(spec).exists()`, but False instead of an exception for a name no file can have.

    A name too long for the file system (or with a NUL byte) raises OSError / ValueError in
    `Path.exists`; such a name names nothing, which is what the caller reports.
    """
    try:
        return Path(spec).exists()
    except (OSError, ValueError):
        return False


def looks_like_hub_id(spec: str) -> bool:
    """`org/name` with no local meaning: left for the loader to try on the hub."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path_exists(spec)


def resolve_target(
    model: str | None,
    task: str,
    *,
    gguf_file: str | None = None,
    task_options: dict[str, Any] | None = None,
    template: str | None = None,
) -> Target:
    """Fill in the defaults for `model` on `task`; UserError for an unknown task or missing model."""
    from rlino.tasks import task_names

    if task not in task_names():
        raise UserError(f"unknown task {task!r}; known: {', '.join(task_names())}")
    if model is None:
        if task != "countdown":
            raise UserError(f"task {task!r} needs a model: pass --model DIR|ID")
        model = str(tiny_model_dir())
    elif not looks_like_hub_id(model) and not path_exists(model):
        raise UserError(f"model {model!r} does not exist")
    options = dict(task_options or {})
    recorded = task_settings(model) if path_exists(model) and Path(model).is_dir() else None
    if recorded and recorded.get("task") == task:
        options = {**recorded.get("options", {}), **options}
        template = template or recorded.get("template")
    return Target(model, gguf_file, task, options, template)
