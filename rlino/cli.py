"""The `rlino` command-line app: one typer app, each command a thin wrapper over library functions.

User mistakes (`UserError`) become a one-line `error: ...` on stderr and exit code 2; heavy imports
(torch, transformers) happen inside commands so that `rlino grade` and `--help` start fast.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from rlino.cli_options import (
    data_option,
    device_option,
    dtype_option,
    gguf_file_option,
    json_option,
    model_option,
    quiet_option,
    seed_option,
    task_opt_option,
    task_option,
    template_option,
)
from rlino.errors import UserError

# rlino draws its own progress bars; the per-file "Loading weights" bars of transformers are noise.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    name="rlino",
    help="Outcome-reward post-training: GRPO and filtered iterative SFT, measured side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError (and a missing file) into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError) as e:
            # one line even when the message quotes another tool's multi-line text
            message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            print(f"error: {message or type(e).__name__}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


# ---- commands (each section owned by one module; keep the wrappers thin) ----
# @@ grade @@
@app.command("grade")
@user_errors
def grade_command(
    file: str = typer.Argument(
        ..., help="JSONL records with a `response` and the task's fields; - for stdin."
    ),
    task: str = task_option(...),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip malformed lines (listed in the summary) instead of failing."
    ),
    task_opt: list[str] = task_opt_option(),
) -> None:
    """Grade responses offline: JSONL in; out, the same records plus correct, reward, extracted."""
    from rlino.config import parse_task_options
    from rlino.grade import grade_stream
    from rlino.tasks import get_task

    grader = get_task(task, **parse_task_options(task_opt))
    if file == "-":
        summary = grade_stream(grader, sys.stdin.buffer, sys.stdout.buffer, skip_bad)
    else:
        with open(file, "rb") as lines:
            summary = grade_stream(grader, lines, sys.stdout.buffer, skip_bad)
    sys.stdout.flush()
    print(summary.describe(), file=sys.stderr)


# @@ pretrain @@
@app.command("pretrain")
@user_errors
def pretrain_command(
    out: str = typer.Option(
        None, "--out", help="Directory to write the HF model into (with --recipe: the cache)."
    ),
    recipe: str = typer.Option(
        None,
        "--recipe",
        help="Built-in base: countdown, countdown-weak, countdown-medium, countdown-strong.",
    ),
    task: str = task_option("countdown"),
    seed: int = seed_option(0),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default 1000)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Sequences per step (default 32)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 5e-3)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default 2)."),
    style: list[str] = typer.Option(
        [], "--style", help="Trace sloppiness KEY=VALUE, e.g. hit=0.5 (see rlino.tiny_corpus)."
    ),
    task_opt: list[str] = task_opt_option(),
    eval_examples: int = typer.Option(
        200, "--eval-examples", help="Test examples for base_eval.json (0 = no evaluation)."
    ),
    quiet: bool = quiet_option(),
) -> None:
    """Pretrain the built-in tiny base model from scratch on synthetic task traces (CPU, minutes)."""
    args = dict(locals())
    from rlino.tiny_bases import run_pretrain_command

    run_pretrain_command(**args)


# @@ eval @@
@app.command("eval")
@user_errors
def eval_command(
    model: str = model_option(),
    gguf_file: str = gguf_file_option(),
    task: str = task_option("countdown"),
    split: str = typer.Option("test", "--split", help="Data split: train or test."),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate only the first N examples."),
    samples: int = typer.Option(
        1, "--samples", min=1, help="K samples per prompt: reports pass@k and mean@k."
    ),
    temperature: float = typer.Option(
        None, "--temperature", min=0.0, help="Default 0 (greedy) for K=1, 1.0 for K>1."
    ),
    max_new_tokens: int = typer.Option(
        None, "--max-new-tokens", min=1, help="Completion cap (default 128, 512 for gsm8k)."
    ),
    template: str = template_option(),
    data: str = data_option(),
    task_opt: list[str] = task_opt_option(),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Prompts per sampling batch."),
    backend: str = typer.Option(
        "builtin", "--backend", help="Sampling engine: builtin, hf or vllm."
    ),
    dtype: str = dtype_option("auto"),
    device: str = device_option("auto"),
    seed: int = seed_option(0),
    save: str = typer.Option(
        None, "--save", help="Write graded completions as JSONL (gradable by `rlino grade`)."
    ),
    json_out: bool = json_option(),
) -> None:
    """Evaluate a model on a task: greedy pass@1, or pass@k / mean@k with --samples K; lengths by correctness."""
    args = dict(locals())
    from rlino.cli_eval import run_eval_command

    run_eval_command(**args)


# @@ train @@
@app.command("train")
@user_errors
def train_command(
    config: str = typer.Option(
        None, "--config", "-c", help="YAML preset: a path or a name in configs/."
    ),
    task: str = task_option(),
    method: str = typer.Option(
        None, "--method", help="grpo, grpo-nokl, fisft+, fisft-, fisft+-, fisft-grpo, raft, ..."
    ),
    model: str = model_option(),
    gguf_file: str = gguf_file_option(),
    data: str = data_option(),
    task_opt: list[str] = task_opt_option(),
    template: str = template_option(),
    dtype: str = dtype_option(),
    device: str = device_option(),
    out: str = typer.Option(None, "--out", help="Run directory (default runs/TASK-METHOD-sSEED)."),
    iterations: int = typer.Option(None, "--iterations", help="Number of iterations."),
    seed: int = seed_option(),
    overrides: list[str] = typer.Option(
        [], "--set", help="Config override key=value, e.g. optim.lr=1e-4 (repeatable)."
    ),
    resume: str = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last checkpoint."
    ),
    stop_after: int = typer.Option(
        None, "--stop-after", hidden=True, help="Stop after N iterations this invocation."
    ),
    quiet: bool = quiet_option(),
    print_config: bool = typer.Option(
        False,
        "--print-config",
        help="Print the resolved config as YAML and exit (loads no model, needs no GPU).",
    ),
) -> None:
    """Train a policy: sample -> verify -> weigh -> update -> evaluate -> checkpoint."""
    args = dict(locals())
    from rlino.cli_train import run_train_command

    run_train_command(**args)


# @@ analyze @@
analyze_app = typer.Typer(
    help="The paper's analyses: gradient equivalence of GRPO and F-ISFT; length dynamics of runs.",
    no_args_is_help=True,
)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("equivalence")
@user_errors
def analyze_equivalence_command(
    model: str = model_option(),
    gguf_file: str = gguf_file_option(),
    task: str = task_option("countdown"),
    task_opt: list[str] = task_opt_option(),
    template: str = template_option(),
    prompts: int = typer.Option(8, "--prompts", min=1, help="P: prompts in the batch."),
    samples: int = typer.Option(8, "--samples", min=2, help="G: samples per prompt."),
    seed: int = seed_option(0),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Completion cap."),
    inner_steps: int = typer.Option(
        3, "--inner-steps", min=1, help="k: AdamW steps before the off-policy gradient."
    ),
    inner_lr: float = typer.Option(1e-5, "--inner-lr", help="Learning rate of those k steps."),
    beta: float = typer.Option(0.04, "--beta", help="KL coefficient of the KL rows."),
    device: str = device_option("auto"),
    dtype: str = dtype_option("fp32"),  # fp32 by default: the comparisons are exact
    json_out: bool = json_option(),
) -> None:
    """Gradient of GRPO vs F-ISFT (and variants) on one real rollout batch: cosine, relative difference."""
    options = dict(locals())
    from rlino.analysis.equivalence_cli import equivalence_command

    equivalence_command(**options)


@analyze_app.command("lengths")
@user_errors
def analyze_lengths_command(
    run_dirs: list[str] = typer.Argument(
        ...,
        help="Run directories, a comparison's runs/LABEL directories, or a `rlino compare` directory.",
    ),
    out: str = typer.Option(
        None,
        "--out",
        help="Where the plots go (default: the comparison's lengths/, else lengths/ beside the run).",
    ),
    json_out: bool = json_option(),
) -> None:
    """Length dynamics: correct vs wrong lengths over time, distributions, per-token weight vs length."""
    options = dict(locals())
    from rlino.analysis.lengths import lengths_command

    lengths_command(**options)


# @@ compare @@
@app.command("compare")
@user_errors
def compare_command(
    config: str = typer.Argument(
        None, help="Compare config YAML (a path or a name in configs/, e.g. compare-paper)."
    ),
    methods: str = typer.Option(
        None,
        "--methods",
        help="Comma-separated method names, e.g. grpo,fisft+ (overrides the config).",
    ),
    seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2."),
    iterations: int = typer.Option(None, "--iterations", min=1, help="Iterations per run."),
    out: str = typer.Option(
        None, "--out", help="Output directory (default runs/CONFIG-NAME or runs/compare)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Shared training override key=value (repeatable)."
    ),
    report_only_dir: str = typer.Option(
        None, "--report-only", help="Only rebuild report.md, summary.json and plots in DIR."
    ),
    quiet: bool = quiet_option(),
) -> None:
    """(Bases x) methods x seeds, same prompts per seed; resumable; report.md + plots (+ pass@k)."""
    options = dict(locals())
    from rlino.analysis.compare import compare_command as run

    run(**options)


# @@ demo @@
@app.command("demo")
@user_errors
def demo_command(
    out: str = typer.Option("runs/demo", "--out", help="Output directory (re-running resumes)."),
    seeds: str = typer.Option(
        None, "--seeds", help="Seeds, e.g. 0,1,2 (default: configs/demo.yaml)."
    ),
    iterations: int = typer.Option(None, "--iterations", min=1, help="Iterations per run."),
    quiet: bool = quiet_option(),
) -> None:
    """The paper's comparison on the built-in tiny base: GRPO, GRPO w/o KL, F-ISFT+, F-ISFT-, F-ISFT+- x 3 seeds."""
    from pathlib import Path

    from rlino.demo import run_demo

    run_demo(Path(out), seeds=seeds, iterations=iterations, progress=not quiet)
