"""Options several `rlino` commands share: one definition and one help text per flag.

Each function returns a fresh `typer.Option` for one command's signature and takes that command's
default, so `--dtype` reads the same in `rlino eval --help` and `rlino train --help` while eval
defaults to `auto` and train to the config's value. The help never states the default: typer
prints each command's own.
"""

from __future__ import annotations

from typing import Any

import typer

MODEL_HELP = "HF model dir, hub id or .gguf file (default on countdown: the built-in tiny base)."
GGUF_FILE_HELP = "GGUF file name inside --model, when --model is a directory."
TASK_HELP = "Task: countdown, gsm8k, or a registered one."
TASK_OPT_HELP = "Task option key=value, e.g. max_number=30 or format_reward=0.2 (repeatable)."
TEMPLATE_HELP = (
    "Prompt template: r1, plain or chat (default: the model's recorded one, else the task's)."
)
DATA_HELP = "Task data: a local file/dir or an HF dataset id."
DTYPE_HELP = "Compute dtype: auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16."
DEVICE_HELP = "Device: auto (cuda if available, else cpu), cpu, cuda or cuda:N."
SEED_HELP = "Random seed: the same seed and settings give the same result."
JSON_HELP = "Print one JSON object as the last stdout line."
QUIET_HELP = "No progress bars or progress lines."


def model_option(default: str | None = None) -> Any:
    """`--model`: the policy to load."""
    return typer.Option(default, "--model", help=MODEL_HELP)


def gguf_file_option(default: str | None = None) -> Any:
    """`--gguf-file`: which GGUF file of a model directory."""
    return typer.Option(default, "--gguf-file", help=GGUF_FILE_HELP)


def task_option(default: Any = None) -> Any:
    """`--task`: the task by name (`...` makes it required)."""
    return typer.Option(default, "--task", help=TASK_HELP)


def task_opt_option() -> Any:
    """`--task-opt key=value`, repeatable; an empty list when not given."""
    return typer.Option([], "--task-opt", help=TASK_OPT_HELP)


def template_option(default: str | None = None) -> Any:
    """`--template`: the prompt template."""
    return typer.Option(default, "--template", help=TEMPLATE_HELP)


def data_option(default: str | None = None) -> Any:
    """`--data`: where the task's examples come from."""
    return typer.Option(default, "--data", help=DATA_HELP)


def dtype_option(default: str | None = None) -> Any:
    """`--dtype`: the dtype the arithmetic runs in."""
    return typer.Option(default, "--dtype", help=DTYPE_HELP)


def device_option(default: str | None = None) -> Any:
    """`--device`: where the model runs."""
    return typer.Option(default, "--device", help=DEVICE_HELP)


def seed_option(default: int | None = None) -> Any:
    """`--seed`: the random seed."""
    return typer.Option(default, "--seed", help=SEED_HELP)


def json_option() -> Any:
    """`--json` (parameter `json_out`): machine-readable output as the last stdout line."""
    return typer.Option(False, "--json", help=JSON_HELP)


def quiet_option() -> Any:
    """`--quiet`: no progress output."""
    return typer.Option(False, "--quiet", help=QUIET_HELP)
