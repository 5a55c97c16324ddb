"""`rlino demo`: the paper's comparison on the built-in tiny Countdown base, in one command.

It runs the `configs/demo.yaml` grid (GRPO, GRPO w/o KL, F-ISFT+, F-ISFT-, F-ISFT+- x 3 seeds, the
same prompts per seed) with `rlino compare`, measures the GRPO vs F-ISFT gradient equivalence on
one batch of the base model's rollouts, and prints both, with the paths of the report and plots.
Re-running the command resumes: finished runs are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEMO_SPEC = "demo"


def _pct(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    if stats["n"] > 1:
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"
    return f"{100 * stats['mean']:.1f}"


def _num(stats: dict[str, Any] | None) -> str:
    return "-" if not stats else f"{stats['mean']:.0f}"


def summary_table(methods: dict[str, dict[str, Any]]) -> Any:
    """A rich table of the comparison: accuracy before/after, gain, lengths of correct/wrong answers."""
    from rich.table import Table

    table = Table(
        title="Tiny Countdown base: greedy test accuracy (%) and lengths (tokens), mean ± std over seeds"
    )
    for name in (
        "method",
        "seeds",
        "start acc",
        "final acc",
        "gain",
        "len correct end",
        "len wrong start",
        "len wrong end",
    ):
        table.add_column(name, justify="left" if name == "method" else "right")
    for label, row in methods.items():
        table.add_row(
            label,
            str(row.get("finished", 0)),
            _pct(row.get("start_accuracy")),
            _pct(row.get("final_accuracy")),
            _pct(row.get("gain")),
            _num(row.get("end_length_correct")),
            _num(row.get("start_length_wrong")),
            _num(row.get("end_length_wrong")),
        )
    return table


def run_demo(
    out: Path, *, seeds: str | None, iterations: int | None, progress: bool
) -> dict[str, Any]:
    """Run (or resume) the demo grid and the equivalence check; print the results; return them."""
    from rich.console import Console

    from rlino.analysis.compare import load_spec, run_compare, spec_from_flags
    from rlino.analysis.equivalence import gradient_equivalence
    from rlino.policy import load_policy
    from rlino.resolve import resolve_target
    from rlino.tasks import get_task

    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the table
        console = Console(width=130)
    spec = spec_from_flags(load_spec(DEMO_SPEC), seeds=seeds, iterations=iterations)
    console.print(
        f"rlino demo: {len(spec.methods)} methods x {len(spec.seeds)} seeds on the tiny Countdown base -> {out}"
    )
    report = run_compare(spec, out, progress=progress)
    summary = json.loads((out / "summary.json").read_text())

    console.print("gradient equivalence on one batch of the base model's rollouts ...")
    target = resolve_target(None, "countdown")
    policy = load_policy(target.model_path)
    equivalence = gradient_equivalence(  # without the vine rows: minutes of extra sampling
        policy,
        get_task("countdown", **target.task_options),
        template=target.template,
        seed=0,
        mc_samples=0,
    )
    (out / "equivalence.json").write_text(json.dumps(equivalence, indent=2) + "\n")

    console.print(summary_table(summary["methods"]))
    console.print(
        f"GRPO (beta 0, on-policy, seq-mean) vs F-ISFT with GRPO's weights: gradient cosine "
        f"{equivalence['grpo_vs_fisft_cosine']:.6f}; vs GRPO with token-mean: "
        f"{equivalence['grpo_vs_token_mean_cosine']:.4f}"
    )
    console.print(f"report: {report}")
    for plot in summary.get("plots", []):
        console.print(f"plot:   {out / plot}")
    console.print(f"equivalence: {out / 'equivalence.json'}")
    return {"summary": summary, "equivalence": equivalence}
