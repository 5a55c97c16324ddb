"""Shared CLI options: one help text per flag, and `rlino train` takes eval's model/task options."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from rlino import cli

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = (
    "--model",
    "--gguf-file",
    "--task",
    "--task-opt",
    "--template",
    "--data",
    "--dtype",
    "--device",
    "--seed",
    "--json",
    "--quiet",
)


def _commands() -> dict[str, Any]:
    """Every leaf command of the app by its full name, e.g. "analyze equivalence"."""
    root: Any = typer.main.get_command(cli.app)
    out: dict[str, Any] = {}
    for name, command in root.commands.items():
        if hasattr(command, "commands"):  # a command group
            out.update({f"{name} {sub}": c for sub, c in command.commands.items()})
        else:
            out[name] = command
    return out


def _option(command: Any, flag: str) -> Any:
    return next((p for p in command.params if flag in getattr(p, "opts", ())), None)


def test_each_shared_option_has_one_help_text() -> None:
    commands = _commands()
    seen: dict[str, set[str]] = {flag: set() for flag in SHARED}
    for command in commands.values():
        for flag in SHARED:
            if (param := _option(command, flag)) is not None:
                seen[flag].add(param.help)
    for flag, texts in seen.items():
        assert len(texts) == 1, (flag, texts)
    for name in ("eval", "train", "analyze equivalence"):
        for flag in ("--model", "--gguf-file", "--task", "--task-opt", "--template", "--dtype"):
            assert _option(commands[name], flag) is not None, (name, flag)
    # each command keeps its own default
    assert _option(commands["eval"], "--dtype").default == "auto"
    assert _option(commands["analyze equivalence"], "--dtype").default == "fp32"
    assert _option(commands["train"], "--dtype").default is None


def test_train_and_eval_help_show_the_same_option_text() -> None:
    runner = CliRunner()
    for name in ("train", "eval"):
        result = runner.invoke(cli.app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for flag in ("--template", "--dtype", "--device", "--gguf-file", "--task-opt"):
            assert flag in result.output
        assert "Prompt template: r1, plain or chat" in result.output
        assert "Compute dtype: auto (bf16 on a GPU, fp32 on a CPU)" in result.output


def test_cli_parameter_names_match_the_command_bodies() -> None:
    """cli.py passes **locals() on: its parameter names must be the bodies' keyword names."""
    from rlino.analysis.equivalence_cli import equivalence_command
    from rlino.cli_eval import run_eval_command
    from rlino.cli_train import run_train_command

    for wrapper, body in (
        (cli.eval_command, run_eval_command),
        (cli.train_command, run_train_command),
        (cli.analyze_equivalence_command, equivalence_command),
    ):
        assert set(inspect.signature(wrapper).parameters) == set(
            inspect.signature(body).parameters
        ), wrapper.__name__


def test_train_takes_template_task_opt_dtype_device(
    tiny_random_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = [
        "train", "--model", str(tiny_random_model_dir), "--task", "countdown",
        "--task-opt", "max_number=20", "--template", "plain", "--dtype", "fp32",
        "--device", "cpu", "--iterations", "1", "--quiet", "--out", str(run),
        "--set", "rollout.prompts_per_iter=2", "--set", "rollout.samples_per_prompt=2",
        "--set", "rollout.max_new_tokens=8", "--set", "eval.num_examples=2",
        "--set", "tensorboard=false", "--set", "threads=1",
    ]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["task"]["template"] == "plain"
    assert config["task"]["options"]["max_number"] == 20
    assert (config["model"]["dtype"], config["model"]["device"]) == ("fp32", "cpu")
    assert (run / "final").is_dir()

    # the run's own config is kept on --resume: changing the template there is refused
    resumed = CliRunner().invoke(
        cli.app, ["train", "--resume", str(run), "--template", "chat", "--quiet"]
    )
    assert resumed.exit_code == 2
    assert "--resume takes the run's own config" in resumed.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task-opt", "max_number"], "--task-opt 'max_number' is not of the form key=value"),
        (["--dtype", "fp64"], "model.dtype must be auto, fp32, bf16 or fp16"),
        (["--template", "nosuch"], "unknown template"),
    ],
)
def test_bad_train_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli.app, ["train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()
