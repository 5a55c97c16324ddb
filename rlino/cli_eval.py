"""`rlino eval`: load a policy and a task, evaluate, print a table (and JSON), save completions."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlino.errors import UserError


def run_eval_command(
    *,
    model: str | None,
    gguf_file: str | None,
    task: str,
    split: str,
    limit: int | None,
    samples: int,
    temperature: float | None,
    max_new_tokens: int | None,
    template: str | None,
    data: str | None,
    task_opt: list[str],
    batch_size: int,
    backend: str,
    dtype: str,
    device: str,
    seed: int,
    save: str | None,
    json_out: bool,
) -> None:
    """Body of `rlino eval` (see `rlino eval --help`)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rlino.cli_train import check_backend
    from rlino.config import parse_task_options
    from rlino.evaluate import evaluate
    from rlino.policy import load_policy
    from rlino.resolve import resolve_target
    from rlino.tasks import get_task, get_template
    from rlino.tasks.templates import check_chat_template

    if split not in ("train", "test"):
        raise UserError(f"--split must be train or test, got {split!r}")
    options = parse_task_options(task_opt)
    if data is not None:
        options["path"] = data
    target = resolve_target(
        model, task, gguf_file=gguf_file, task_options=options, template=template
    )
    task_obj = get_task(task, **target.task_options)
    template = target.template or task_obj.default_template
    get_template(template)
    examples = task_obj.examples(split)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserError(f"task {task!r} has no {split} examples")
    if temperature is None:
        temperature = 0.0 if samples == 1 else 1.0
    if max_new_tokens is None:
        max_new_tokens = 512 if task == "gsm8k" else 128
    check_backend(backend, device)
    policy = load_policy(target.model_path, gguf_file=gguf_file, device=device, dtype=dtype)
    check_chat_template(template, policy.tokenizer)  # before the progress bar draws
    err = Console(stderr=True)
    with Progress(
        TextColumn(f"eval {task}/{split}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        bar = progress.add_task("eval", total=len(examples))
        report = evaluate(
            policy,
            task_obj,
            examples,
            template=template,
            samples=samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            backend=backend,
            on_batch=lambda done: progress.update(bar, completed=done),
        )
    summary = {
        "model": target.model_path,
        "task": task,
        "split": split,
        "template": template,
        **report.summary(),
    }
    if save:
        save_completions(Path(save), report, examples)
    title = f"{task} {split} ({report.n} examples, {samples} sample(s) each)"
    print_summary(summary, title, json_out)


def save_completions(path: Path, report: Any, examples: list[dict[str, Any]]) -> None:
    """Graded completions as JSONL, each with its example's fields (gradable by `rlino grade`)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for c in report.completions:
            f.write(json.dumps({**examples[c.index], **asdict(c)}) + "\n")
    tmp.replace(path)


def print_summary(summary: dict[str, Any], title: str, json_out: bool) -> None:
    """The metrics as a table (on stderr when --json puts one JSON object on stdout)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("model", "task", "split"):
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console(file=sys.stdout if not json_out else sys.stderr).print(table)
    if json_out:
        print(json.dumps(summary))
