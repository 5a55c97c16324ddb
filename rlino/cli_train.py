"""`rlino train`: build the config from preset + shortcuts + overrides (or a run dir), then train."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlino.errors import UserError

if TYPE_CHECKING:
    from rlino.config import TrainConfig


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


def resolve_train_config(
    *,
    config: str | None,
    method: str | None,
    items: list[str],
    resume: str | None,
    run_settings: Sequence[Any],
) -> tuple[TrainConfig, list[str]]:
    """The run's TrainConfig (validated) and the notes about preset settings `--method` dropped.

    Order: the preset (or the run's config.yaml on --resume), then `--method` (carrying over the
    preset's method settings that apply to it), then the shortcuts and `--set`s, which win.
    """
    from rlino.config import deep_merge, load_config, parse_override, preset_path, read_yaml
    from rlino.method_switch import carry_params

    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
        if config is not None or any(run_settings):
            raise UserError(
                "--resume takes the run's own config; only --iterations and --set may change it"
            )
        return load_config(str(run_dir / "config.yaml"), items), []
    raw = read_yaml(preset_path(config)) if config else {}
    notes: dict[str, str] = {}
    if method is not None:
        block = raw.get("method")
        raw["method"], notes = carry_params(
            block if isinstance(block, dict) else {}, method, who=f"--method {method}"
        )
    for item in items:
        raw = deep_merge(raw, parse_override(item))
    cfg = load_config(None, raw)
    # a dropped setting the user set again with --set is not dropped: no note for it
    explicit: set[str] = set()
    for item in items:
        if isinstance(given := parse_override(item).get("method"), dict):
            explicit |= set(given)
    return cfg, [note for key, note in notes.items() if key not in explicit]


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
    print_config: bool = False,
) -> None:
    """Body of `rlino train` (see `rlino train --help`).

    With `print_config`, print the resolved config as YAML (what `config.yaml` of the run would
    hold) on stdout and return before anything is loaded: no model, device or backend is needed.
    """
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
    run_settings = (task, method, model, gguf_file, data, task_opt, template, dtype, device)
    cfg, notes = resolve_train_config(
        config=config, method=method, items=items, resume=resume, run_settings=run_settings
    )
    for note in notes:
        print(note, file=sys.stderr)
    if print_config:
        import yaml

        from rlino.config import to_dict

        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return
    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = (
            Path(out) if out else Path("runs") / f"{cfg.task.name}-{cfg.method.name}-s{cfg.seed}"
        )
    if resume is None:
        preflight(cfg)
    from rlino.distributed import env_world
    from rlino.train import train

    result = train(
        cfg, run_dir, resume=resume is not None, progress=not quiet, stop_after=stop_after
    )
    if env_world()[0] == 0:  # under torchrun, one report (rank 0's)
        _report(result)
    if result.interrupted:
        raise SystemExit(130)


def preflight(cfg: TrainConfig) -> None:
    """Mistakes `train` would find only after making the run directory, found before it.

    `train` makes the run directory once the model has loaded; the sampling backend and the
    chat template are used only later, at the first rollout, so a missing vLLM or a tokenizer
    without a chat template would otherwise leave a half-made run behind.
    """
    check_backend(cfg.rollout.backend, cfg.model.device)
    check_template_early(cfg)


def check_backend(backend: str, device: str) -> None:
    """UserError when sampling `backend` cannot run here (unknown, or vLLM missing or off CUDA)."""
    import importlib.util

    from rlino.policy import resolve_device
    from rlino.rollout import BACKENDS

    if backend not in BACKENDS:
        raise UserError(f"unknown rollout backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise UserError("rollout backend 'vllm' needs the vllm package (pip install 'rlino[vllm]')")
    if resolve_device(device).type != "cuda":
        raise UserError("rollout backend 'vllm' needs the policy on a CUDA device (--device cuda)")


def check_template_early(cfg: TrainConfig) -> None:
    """UserError when the run's template is a chat template its model's tokenizer lacks.

    Only the tokenizer is loaded, and only when the template is a chat template.
    """
    from rlino.policy import load_tokenizer
    from rlino.setup import target_of
    from rlino.tasks import get_task, get_template
    from rlino.tasks.templates import check_chat_template

    target = target_of(cfg)
    name = target.template or get_task(target.task, **target.task_options).default_template
    if get_template(name).chat:
        check_chat_template(name, load_tokenizer(target.model_path, gguf_file=target.gguf_file))


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
