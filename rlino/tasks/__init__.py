"""Tasks: data + prompt + verifier. `get_task("countdown")`, or register your own with `register_task`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlino.errors import UserError
from rlino.tasks.base import Example, Score, Task
from rlino.tasks.templates import (
    Template,
    encode_prompts,
    get_template,
    register_template,
    template_names,
)

_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Decorator: register a Task class or factory under `name` (its keyword args are task options)."""

    def decorate(factory: Callable[..., Task]) -> Callable[..., Task]:
        _REGISTRY[name] = factory
        return factory

    return decorate


def get_task(name: str, **options: Any) -> Task:
    """Build the task called `name` with `options`; unknown names and options are UserErrors."""
    _load_builtins()
    if name not in _REGISTRY:
        raise UserError(f"unknown task {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:
        raise UserError(f"bad options for task {name!r}: {e}") from None


def task_names() -> list[str]:
    """Names of all registered tasks."""
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    import rlino.tasks.countdown  # registers "countdown"
    import rlino.tasks.gsm8k  # noqa: F401  (registers "gsm8k")


__all__ = [
    "Example",
    "Score",
    "Task",
    "Template",
    "encode_prompts",
    "get_task",
    "get_template",
    "register_task",
    "register_template",
    "task_names",
    "template_names",
]
