"""Accuracy against sampled tokens: runs of one or more comparison directories on one axis.

A method that samples extra continuations (`vine`'s Monte-Carlo values) costs far more tokens per
iteration than GRPO, so comparing them per iteration flatters it. Here every run's x-axis is the
tokens it sampled so far, its rollouts (`train/sampled_tokens`) plus its continuations
(`train/mc_tokens`), and each method is read at a common token budget. Runs are those of
`rlino compare` output directories (`OUT/runs/LABEL/seedN/metrics.jsonl`); several directories
can be merged, e.g. the vine grid and a longer GRPO grid given the same token budget.

    python -m rlino.analysis.budget runs/vine-cmp runs/vine-cmp-budget --out runs/vine-cmp

writes `budget.png` and `budget.json` there and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlino.analysis.report import curves, parse_run_dir, run_dirs
from rlino.errors import UserError
from rlino.runlog import read_jsonl

TOKENS = "budget/tokens"
"""The running total of tokens sampled, added to each metrics row here (not logged by runs)."""


def with_token_totals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of a run's metrics rows, each with `budget/tokens`: the tokens sampled up to and
    including its iteration (rollouts plus Monte-Carlo continuations; 0 before training)."""
    total = 0
    out = []
    for row in sorted(rows, key=lambda r: int(r["iteration"])):
        total += int(row.get("train/sampled_tokens") or 0) + int(row.get("train/mc_tokens") or 0)
        out.append({**row, TOKENS: total})
    return out


def load_runs(out_dirs: Sequence[Path]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every run of the directories, keyed (label, seed), rows with token totals.

    A label found in several directories (grpo at vine's iterations and grpo at vine's token
    budget) is told apart by its directory: `grpo (vine-cmp-budget)`.
    """
    found: list[tuple[str, Path, int, Path]] = []
    for out_dir in out_dirs:
        for run in run_dirs(Path(out_dir)):
            label, seed = parse_run_dir(run)
            found.append((label, Path(out_dir), seed, run))
    homes: dict[str, set[Path]] = {}
    for label, home, _, _ in found:
        homes.setdefault(label, set()).add(home)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for label, home, seed, run in found:
        name = label if len(homes[label]) == 1 else f"{label} ({home.name})"
        runs[(name, seed)] = with_token_totals(read_jsonl(run / "metrics.jsonl"))
    if not runs:
        raise UserError(f"no runs with metrics under {', '.join(map(str, out_dirs))}")
    return runs


def budget_curves(
    runs: dict[tuple[str, int], list[dict[str, Any]]],
) -> dict[str, dict[str, list[float]]]:
    """Per label, at each evaluated iteration: mean tokens so far (`tokens`) and the eval accuracy
    over seeds (`mean`, `std`, `n`), plus `iteration`."""
    accuracy = curves(runs, "eval/accuracy")
    tokens = curves(runs, TOKENS)
    out = {}
    for label, acc in accuracy.items():
        at = dict(zip(tokens[label]["iteration"], tokens[label]["mean"], strict=True))
        out[label] = {**acc, "tokens": [at[i] for i in acc["iteration"]]}
    return out


def accuracy_at(curve: dict[str, list[float]], budget: float) -> tuple[float, float] | None:
    """(accuracy, tokens) at the last evaluation within `budget` tokens; None if none is."""
    points = [(t, m) for t, m in zip(curve["tokens"], curve["mean"], strict=True) if t <= budget]
    return (points[-1][1], points[-1][0]) if points else None


def default_budget(runs: dict[tuple[str, int], list[dict[str, Any]]]) -> float:
    """The budget to compare at: the smallest final token total among the labels that sampled
    Monte-Carlo tokens (the expensive method's whole run), else among all labels."""
    finals: dict[str, list[float]] = {}
    mc: set[str] = set()
    for (label, _), rows in runs.items():
        finals.setdefault(label, []).append(float(rows[-1][TOKENS]))
        if any(r.get("train/mc_tokens") for r in rows):
            mc.add(label)
    means = {label: sum(v) / len(v) for label, v in finals.items()}
    return min(means[label] for label in (mc or means))


def budget_table(
    runs: dict[tuple[str, int], list[dict[str, Any]]], budget: float | None = None
) -> dict[str, Any]:
    """JSON-ready summary: per label its iterations, tokens, MC share, final accuracy and the
    accuracy at `budget` tokens (default: `default_budget`)."""
    budget = default_budget(runs) if budget is None else budget
    by_label = budget_curves(runs)
    rows = []
    for label, curve in by_label.items():
        seeds = [rows_ for (lab, _), rows_ in runs.items() if lab == label]
        total = sum(float(r[-1][TOKENS]) for r in seeds) / len(seeds)
        mc = sum(sum(int(x.get("train/mc_tokens") or 0) for x in r) for r in seeds) / len(seeds)
        at = accuracy_at(curve, budget)
        rows.append(
            {
                "label": label,
                "seeds": len(seeds),
                "iterations": max(int(r[-1]["iteration"]) for r in seeds),
                "tokens": total,
                "mc_share": mc / total if total else 0.0,
                "final_accuracy": curve["mean"][-1] if curve["mean"] else None,
                "final_accuracy_std": curve["std"][-1] if curve["std"] else None,
                "accuracy_at_budget": None if at is None else at[0],
                "tokens_at_budget": None if at is None else at[1],
            }
        )
    return {"budget_tokens": budget, "rows": rows, "curves": by_label}


def render_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (accuracy in %, tokens in millions)."""

    def pct(x: float | None) -> str:
        return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"

    lines = [
        f"accuracy at {summary['budget_tokens'] / 1e6:.2f} M sampled tokens (rollouts + MC):",
        "",
        "| method | seeds | iterations | tokens (M) | MC share | final accuracy | at budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        final = f"{pct(r['final_accuracy'])} ± {pct(r['final_accuracy_std'])}"
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['iterations']} | {r['tokens'] / 1e6:.2f} | "
            f"{r['mc_share']:.0%} | {final} | {pct(r['accuracy_at_budget'])} |"
        )
    return "\n".join(lines) + "\n"


def budget_plot(by_label: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Eval accuracy (mean over seeds, band ± std) against tokens sampled, one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlino.analysis.plots import DPI, FIGSIZE

    fig, ax = plt.subplots(figsize=FIGSIZE)
    for label, c in by_label.items():
        x = [t / 1e6 for t in c["tokens"]]
        (line,) = ax.plot(x, [100 * m for m in c["mean"]], label=label, marker="o", ms=2)
        lo = [100 * (m - s) for m, s in zip(c["mean"], c["std"], strict=True)]
        hi = [100 * (m + s) for m, s in zip(c["mean"], c["std"], strict=True)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("tokens sampled, millions (rollouts + Monte-Carlo continuations)")
    ax.set_ylabel("eval accuracy, %")
    ax.set_title("accuracy against sampling cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rlino.analysis.budget DIR [DIR ...]`: plot, JSON and table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="rlino compare output directories")
    parser.add_argument("--out", type=Path, help="where budget.png/json go (default: first DIR)")
    parser.add_argument("--budget", type=float, help="tokens to compare at (default: vine's total)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.dirs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = budget_table(runs, args.budget)
    out = args.out or args.dirs[0]
    budget_plot(summary["curves"], out / "budget.png")
    (out / "budget.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(render_table(summary), end="")
    print(f"plot: {out / 'budget.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
