"""`rlino train`: build the config from preset + shortcuts + overrides (or a run dir), then train."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlino.errors import UserError


def build_overrides(
    task: str | None,
    model: str | None,
    data: str | None,
    iterations: int | None,
    seed: int | None,
    overrides: list[str],
    *,
    gguf_file: str | None = None,
    template: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    task_opt: Sequence[str] = (),
) -> list[str]:
    """The command-line shortcuts as `key=value` overrides, applied before explicit `--set`s.

    Each shortcut sets the config key that means what `rlino eval`'s option of the same name
    means (`--template` is `task.template`, `--dtype` is `model.dtype`); `--task-opt K=V` sets
    `task.options.K`.
    """
    shortcuts = {
        "task.name": task,
        "task.template": template,
        "model.path": model,
        "model.gguf_file": gguf_file,
        "model.dtype": dtype,
        "model.device": device,
        "task.options.path": data,
        "iterations": iterations,
        "seed": seed,
    }
    items = [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    for option in task_opt:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--task-opt {option!r} is not of the form key=value")
        items.append(f"task.options.{key.strip()}={value}")
    return items + list(overrides)


def run_train_command(
    *,
    config: str | None,
    task: str | None,
    method: str | None,
    model: str | None,
    gguf_file: str | None,
    data: str | None,
    task_opt: list[str],
    template: str | None,
    dtype: str | None,
    device: str | None,
    out: str | None,
    iterations: int | None,
    seed: int | None,
    overrides: list[str],
    resume: str | None,
    stop_after: int | None,
    quiet: bool,
) -> None:
    """Body of `rlino train` (see `rlino train --help`)."""
    from rlino.config import deep_merge, load_config, parse_override, preset_path, read_yaml

    items = build_overrides(
        task,
        model,
        data,
        iterations,
        seed,
        overrides,
        gguf_file=gguf_file,
        template=template,
        dtype=dtype,
        device=device,
        task_opt=task_opt,
    )
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
        run_settings = (task, method, model, gguf_file, data, task_opt, template, dtype, device)
        if config is not None or any(run_settings):
            raise UserError(
                "--resume takes the run's own config; only --iterations and --set may change it"
            )
        cfg = load_config(str(run_dir / "config.yaml"), items)
    else:
        # --method picks a method with its own defaults: a preset's method block (e.g. GRPO's beta)
        # does not carry over to another method. Tune it with --set method.KEY=VALUE.
        raw = read_yaml(preset_path(config)) if config else {}
        if method is not None:
            raw["method"] = {"name": method}
        for item in items:
            raw = deep_merge(raw, parse_override(item))
        cfg = load_config(None, raw)
        run_dir = (
            Path(out) if out else Path("runs") / f"{cfg.task.name}-{cfg.method.name}-s{cfg.seed}"
        )
    from rlino.train import train

    result = train(
        cfg, run_dir, resume=resume is not None, progress=not quiet, stop_after=stop_after
    )
    _report(result)
    if result.interrupted:
        raise SystemExit(130)


def _report(result: Any) -> None:
    from rlino.runlog import read_jsonl

    rows = [
        r
        for r in read_jsonl(result.run_dir / "metrics.jsonl")
        if r.get("eval/accuracy") is not None
    ]
    first, last = (rows[0], rows[-1]) if rows else (None, None)
    state = "finished" if result.completed else "stopped (resume with --resume)"
    print(f"{state} at iteration {result.iterations_done}: {result.run_dir}")
    if first is not None and last is not None:
        print(
            f"eval accuracy {first['eval/accuracy']:.3f} (iteration {first['iteration']}) -> "
            f"{last['eval/accuracy']:.3f} (iteration {last['iteration']})"
        )
