"""Comparison reports: per-run summaries, statistics over seeds, `report.md` and `summary.json`.

A comparison directory holds one run per (method, seed) under `runs/LABEL/seedN/` (see
`rlino.analysis.compare`). Everything here reads only what the runs wrote (`config.yaml`,
`metrics.jsonl`, `wall_time.json`), so `write_report(out_dir)` can regenerate the report and the
plots at any time, also while some runs are still missing.

Statistics are over seeds (`rlino.analysis.seed_stats`): mean, sample standard deviation and a
95% Student's t interval; with a single seed there is no spread, and the report says n=1.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlino.analysis.seed_stats import SeedStats, seed_stats
from rlino.errors import UserError
from rlino.runlog import read_jsonl

SEED_DIR = re.compile(r"^seed(?P<seed>-?\d+)$")
"""A run directory is `runs/LABEL/seedN`: the `/` keeps a label ending in `-` apart from the seed."""
OLD_RUN_DIR = re.compile(r"^.+-s-?\d+$")
"""The earlier flat layout, `runs/LABEL-sSEED`: there `fisft+-s0` (F-ISFT+, seed 0) read as F-ISFT+-."""
WALL_TIME_FILE = "wall_time.json"
"""Written by `run_compare` beside each run: seconds spent in train() over all invocations."""


@dataclass
class RunSummary:
    """The headline numbers of one run, read from its metrics.jsonl."""

    label: str
    seed: int
    iterations: int
    """last training iteration logged"""
    finished: bool
    """the run has final/ (all iterations done)"""
    start_accuracy: float | None
    final_accuracy: float | None
    """eval accuracy at iteration 0 and at the last evaluation"""
    gain: float | None
    start_length_correct: float | None
    start_length_wrong: float | None
    end_length_correct: float | None
    end_length_wrong: float | None
    """eval (greedy) completion lengths in tokens by correctness, at the start and the last eval"""
    train_length_correct_first: float | None
    train_length_wrong_first: float | None
    train_length_correct_last: float | None
    train_length_wrong_last: float | None
    """training-sample lengths by correctness at the first and the last iteration"""
    wall_s: float | None
    """seconds in train() (run_compare's record), else the summed rollout + update times"""
    tokens_sampled: int
    equiv_cosine_onpolicy: float | None = None
    equiv_cosine_offpolicy: float | None = None
    equiv_clip_frac: float | None = None
    """means over the iterations where equivalence was tracked (analysis.equivalence_every)"""
    accuracy_auc: float | None = None
    """area under the eval accuracy curve over the iterations evaluated, divided by their span:
    the mean accuracy along training (trapezoids between evaluations)"""
    weight_sum_mean: float | None = None
    """mean over training iterations of `train/weight_sum_mean` (a group's weights summed: GRPO
    0; how far a weighting pushes a group's likelihood down or up overall)"""
    train_accuracy_mean: float | None = None
    """mean over training iterations of `train/accuracy`, the rollout samples' success rate"""


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    for row in reversed(rows):
        if row.get(key) is not None:
            return float(row[key])
    return None


def _first(rows: list[dict[str, Any]], key: str) -> float | None:
    return _last(list(reversed(rows)), key)


def summarize_rows(rows: list[dict[str, Any]], label: str, seed: int, finished: bool) -> RunSummary:
    """A RunSummary from metrics rows (pure: no files), so it can be tested on synthetic rows."""
    start = next((r for r in rows if r.get("iteration") == 0), {})
    train_rows = [r for r in rows if r.get("iteration", 0) > 0]
    eval_rows = [r for r in rows if r.get("eval/accuracy") is not None]
    end = eval_rows[-1] if eval_rows and eval_rows[-1].get("iteration", 0) > 0 else {}

    def get(row: dict[str, Any], key: str) -> float | None:
        return None if row.get(key) is None else float(row[key])

    start_acc, final_acc = get(start, "eval/accuracy"), get(end, "eval/accuracy")
    timed = [r.get("time/rollout_s", 0.0) + r.get("time/update_s", 0.0) for r in train_rows]
    return RunSummary(
        label=label,
        seed=seed,
        iterations=max((int(r["iteration"]) for r in train_rows), default=0),
        finished=finished,
        start_accuracy=start_acc,
        final_accuracy=final_acc,
        gain=None if start_acc is None or final_acc is None else final_acc - start_acc,
        start_length_correct=get(start, "eval/length_correct"),
        start_length_wrong=get(start, "eval/length_wrong"),
        end_length_correct=get(end, "eval/length_correct"),
        end_length_wrong=get(end, "eval/length_wrong"),
        train_length_correct_first=_first(train_rows, "train/length_correct"),
        train_length_wrong_first=_first(train_rows, "train/length_wrong"),
        train_length_correct_last=_last(train_rows, "train/length_correct"),
        train_length_wrong_last=_last(train_rows, "train/length_wrong"),
        wall_s=sum(timed) if timed else None,
        tokens_sampled=int(sum(r.get("train/sampled_tokens", 0) or 0 for r in train_rows)),
        equiv_cosine_onpolicy=_mean_of(train_rows, "equiv/cosine_onpolicy"),
        equiv_cosine_offpolicy=_mean_of(train_rows, "equiv/cosine_offpolicy"),
        equiv_clip_frac=_mean_of(train_rows, "equiv/clip_frac"),
        accuracy_auc=normalised_area(
            [(float(r["iteration"]), float(r["eval/accuracy"])) for r in eval_rows]
        ),
        weight_sum_mean=_mean_of(train_rows, "train/weight_sum_mean"),
        train_accuracy_mean=_mean_of(train_rows, "train/accuracy"),
    )


def normalised_area(points: Sequence[tuple[float, float]]) -> float | None:
    """Trapezoid area under (x, y) points divided by the x span (the curve's mean height); None
    with fewer than two distinct x. Why normalised: runs of different length stay comparable."""
    pts = sorted(dict(points).items())
    if len(pts) < 2:
        return None
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(pts))
    return area / (pts[-1][0] - pts[0][0])


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def run_name(label: str, seed: int) -> str:
    """The run of (label, seed) as a path under `runs/`: `fisft+-/seed0`."""
    return f"{label}/seed{seed}"


def parse_run_dir(run_dir: Path) -> tuple[str, int]:
    """`.../runs/grpo-token-mean/seed2` -> ("grpo-token-mean", 2)."""
    match = SEED_DIR.match(run_dir.name)
    if match is None:
        raise UserError(f"run directory {run_dir} is not named LABEL/seedN")
    return run_dir.parent.name, int(match["seed"])


def check_layout(runs: Path) -> None:
    """Refuse a `runs/` that holds runs of the old flat layout instead of mixing the two."""
    if not runs.is_dir():
        return
    for child in sorted(runs.iterdir()):
        is_run = (child / "config.yaml").is_file() or (child / "metrics.jsonl").is_file()
        if OLD_RUN_DIR.match(child.name) and is_run:
            raise UserError(
                f"{child} is a run of the old layout runs/LABEL-sSEED; runs now live in "
                f"runs/LABEL/seedN: use a new output directory or move it to "
                f"{runs}/LABEL/seedN"
            )


def summarize_run(run_dir: Path) -> RunSummary:
    """Read one run directory (`runs/LABEL/seedN/`) into a RunSummary."""
    label, seed = parse_run_dir(run_dir)
    summary = summarize_rows(
        read_jsonl(run_dir / "metrics.jsonl"), label, seed, (run_dir / "final").is_dir()
    )
    wall = run_dir / WALL_TIME_FILE
    if wall.is_file():
        summary.wall_s = float(json.loads(wall.read_text())["seconds"])
    return summary


# ---------------------------------------------------------------- over seeds


def _stats_of(runs: Sequence[RunSummary], key: str) -> SeedStats | None:
    return seed_stats([getattr(r, key) for r in runs if getattr(r, key) is not None])


SUMMARY_FIELDS = (
    "final_accuracy",
    "start_accuracy",
    "gain",
    "start_length_correct",
    "start_length_wrong",
    "end_length_correct",
    "end_length_wrong",
    "train_length_correct_first",
    "train_length_wrong_first",
    "train_length_correct_last",
    "train_length_wrong_last",
    "wall_s",
    "tokens_sampled",
    "equiv_cosine_onpolicy",
    "equiv_cosine_offpolicy",
    "equiv_clip_frac",
    "accuracy_auc",
    "weight_sum_mean",
    "train_accuracy_mean",
)


def method_table(runs: Sequence[RunSummary]) -> dict[str, dict[str, Any]]:
    """{label: {"seeds": [...], field: SeedStats as dict}} in the order labels first appear."""
    labels = list(dict.fromkeys(r.label for r in runs))
    table: dict[str, dict[str, Any]] = {}
    for label in labels:
        mine = [r for r in runs if r.label == label]
        entry: dict[str, Any] = {
            "seeds": [r.seed for r in mine],
            "finished": sum(r.finished for r in mine),
        }
        for key in SUMMARY_FIELDS:
            stats = _stats_of(mine, key)
            entry[key] = None if stats is None else asdict(stats)
        table[label] = entry
    return table


def curves(
    rows_by_run: dict[tuple[str, int], list[dict[str, Any]]], key: str
) -> dict[str, dict[str, list[float]]]:
    """Per label: iterations and mean / std of `key` over the seeds that logged it there.

    Iterations where only some seeds logged the key average over those (runs of different length
    are allowed); `n` says how many seeds went into each point.
    """
    out: dict[str, dict[str, list[float]]] = {}
    labels = list(dict.fromkeys(label for label, _ in rows_by_run))
    for label in labels:
        points: dict[int, list[float]] = {}
        for (lab, _seed), rows in rows_by_run.items():
            if lab != label:
                continue
            for row in rows:
                if row.get(key) is not None:
                    points.setdefault(int(row["iteration"]), []).append(float(row[key]))
        its = sorted(points)
        means = [sum(points[i]) / len(points[i]) for i in its]
        stds = [
            math.sqrt(sum((v - m) ** 2 for v in points[i]) / (len(points[i]) - 1))
            if len(points[i]) > 1
            else 0.0
            for i, m in zip(its, means, strict=True)
        ]
        out[label] = {
            "iteration": [float(i) for i in its],
            "mean": means,
            "std": stds,
            "n": [float(len(points[i])) for i in its],
        }
    return out


# ---------------------------------------------------------------- writing


def _fmt(stats: dict[str, Any] | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if stats is None else SeedStats(**stats).text(digits, scale)


def _mean(stats: dict[str, Any] | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if stats is None else f"{stats['mean'] * scale:.{digits}f}"


def render_markdown(
    table: dict[str, dict[str, Any]],
    title: str,
    plots: Sequence[str],
    sections: Sequence[str] = (),
) -> str:
    """report.md: the accuracy table, the length table, costs, `sections` (markdown blocks such
    as accuracy along training and pass@k), and links to the plots."""
    lines = [
        f"# {title}",
        "",
        "Greedy pass@1 on the fixed test subset, in %. Mean ± sample std over seeds, "
        "[95% t confidence interval]; n=1 means a single seed (no spread). AUC: the area under "
        "the eval accuracy curve divided by the iterations it spans (mean accuracy along "
        "training, %).",
        "",
        "| method | seeds | final accuracy | start (base) | gain over base | AUC |",
        "|---|---|---|---|---|---|",
    ]
    for label, e in table.items():
        seeds = ",".join(str(s) for s in e["seeds"])
        lines.append(
            f"| {label} | {seeds} | {_fmt(e['final_accuracy'], 1, 100)} | "
            f"{_mean(e['start_accuracy'], 1, 100)} | {_fmt(e['gain'], 1, 100)} | "
            f"{_fmt(e['accuracy_auc'], 1, 100)} |"
        )
    lines += [
        "",
        "## Lengths (tokens, mean over seeds)",
        "",
        "Eval: greedy test completions at the start and the last evaluation. "
        "Train: sampled completions at the first and the last iteration.",
        "",
        "| method | eval correct start → end | eval wrong start → end "
        "| train correct first → last | train wrong first → last |",
        "|---|---|---|---|---|",
    ]
    for label, e in table.items():
        lines.append(
            f"| {label} "
            f"| {_mean(e['start_length_correct'])} → {_mean(e['end_length_correct'])} "
            f"| {_mean(e['start_length_wrong'])} → {_mean(e['end_length_wrong'])} "
            f"| {_mean(e['train_length_correct_first'])} → {_mean(e['train_length_correct_last'])} "
            f"| {_mean(e['train_length_wrong_first'])} → {_mean(e['train_length_wrong_last'])} |"
        )
    lines += [
        "",
        "## Cost (per run, mean over seeds)",
        "",
        "| method | finished runs | wall time (s) | tokens sampled |",
        "|---|---|---|---|",
    ]
    for label, e in table.items():
        lines.append(
            f"| {label} | {e['finished']}/{len(e['seeds'])} | {_mean(e['wall_s'], 0)} "
            f"| {_mean(e['tokens_sampled'], 0)} |"
        )
    weighed = [label for label, e in table.items() if e["weight_sum_mean"] is not None]
    if weighed:
        lines += [
            "",
            "## Weights (mean over training iterations, then mean ± std over seeds)",
            "",
            "Group weight sum: the sum of a group's per-sample weights (GRPO's are 0; below 0 the "
            "update lowers the group's likelihood overall). Success rate: the fraction of "
            "rollout samples that are correct.",
            "",
            "| method | group weight sum | success rate of the samples (%) |",
            "|---|---|---|",
        ]
        for label in weighed:
            e = table[label]
            lines.append(
                f"| {label} | {_fmt(e['weight_sum_mean'], 3)} "
                f"| {_fmt(e['train_accuracy_mean'], 1, 100)} |"
            )
    tracked = [label for label, e in table.items() if e["equiv_cosine_onpolicy"] is not None]
    if tracked:
        lines += [
            "",
            "## Gradient equivalence along training",
            "",
            "Cosine between the gradient of the update taken and that of the plain weighted "
            "likelihood with the same weights, at the same parameters: on the first optimiser "
            "step of an iteration (on-policy) and on the later ones (off-policy: the ratio has "
            "left 1); mean over tracked iterations, then mean ± std over seeds.",
            "",
            "| method | cosine, first step | cosine, later steps | clipped tokens, later steps |",
            "|---|---|---|---|",
        ]
        for label in tracked:
            e = table[label]
            lines.append(
                f"| {label} | {_fmt(e['equiv_cosine_onpolicy'], 4)} "
                f"| {_fmt(e['equiv_cosine_offpolicy'], 4)} | {_fmt(e['equiv_clip_frac'], 4)} |"
            )
    for section in sections:
        lines += ["", section.rstrip("\n")]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def accuracy_section(curves_by_label: dict[str, dict[str, list[float]]], columns: int = 11) -> str:
    """Greedy accuracy (%, mean over seeds) at the evaluated iterations, one row per label; at
    most `columns` iterations, evenly spread, the first and the last always among them."""
    its = sorted({int(i) for c in curves_by_label.values() for i in c["iteration"]})
    if len(its) > columns:
        picks = {round(j * (len(its) - 1) / (columns - 1)) for j in range(columns)}
        its = [its[j] for j in sorted(picks)]
    lines = [
        "## Accuracy along training",
        "",
        "Greedy pass@1 (%) at the evaluated iterations, mean over seeds.",
        "",
        "| method | " + " | ".join(f"it {i}" for i in its) + " |",
        "|---|" + "---|" * len(its),
    ]
    for label, curve in curves_by_label.items():
        at = dict(zip((int(i) for i in curve["iteration"]), curve["mean"], strict=True))
        cells = [f"{100 * at[i]:.1f}" if i in at else "-" for i in its]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_dirs(out_dir: Path) -> list[Path]:
    """The run directories of a comparison (those with a metrics.jsonl), in spec order if known."""
    runs = out_dir / "runs"
    if not runs.is_dir():
        raise UserError(f"{out_dir} holds no runs/ directory (not a `rlino compare` output)")
    check_layout(runs)
    found = [
        p
        for p in runs.glob("*/seed*")
        if SEED_DIR.match(p.name) and (p / "metrics.jsonl").is_file()
    ]
    order: list[str] = []
    spec_file = out_dir / "compare.json"
    if spec_file.is_file():
        order = json.loads(spec_file.read_text()).get("run_names", [])
    rank = {name: i for i, name in enumerate(order)}

    def key(path: Path) -> tuple[int, str, int]:
        label, seed = parse_run_dir(path)
        return rank.get(run_name(label, seed), len(rank)), label, seed

    return sorted(found, key=key)


def write_report(out_dir: Path, title: str = "rlino comparison") -> dict[str, Any]:
    """(Re)write report.md, summary.json and the plots of a comparison directory; returns the summary."""
    from rlino.analysis.plots import comparison_plots

    out_dir = Path(out_dir)
    dirs = run_dirs(out_dir)
    if not dirs:
        raise UserError(f"no runs with metrics under {out_dir / 'runs'} yet")
    summaries = [summarize_run(d) for d in dirs]
    rows_by_run = {parse_run_dir(d): read_jsonl(d / "metrics.jsonl") for d in dirs}
    table = method_table(summaries)
    plot_curves = {
        key: curves(rows_by_run, key)
        for key in (
            "eval/accuracy",
            "train/reward_mean",
            "train/length_correct",
            "train/length_wrong",
        )
    }
    plots = comparison_plots(plot_curves, out_dir)
    on, off = (
        curves(rows_by_run, "equiv/cosine_onpolicy"),
        curves(rows_by_run, "equiv/cosine_offpolicy"),
    )
    if any(c["iteration"] for c in on.values()):
        from rlino.analysis.plots import line_plot

        both = {f"{k}, first step": v for k, v in on.items()}
        both.update({f"{k}, later steps": v for k, v in off.items() if v["iteration"]})
        plots.append(
            line_plot(
                both,
                out_dir / "equivalence.png",
                title="cos(update taken, weighted-likelihood gradient)",
                ylabel="cosine",
            )
        )
    from rlino.analysis.passk import passk_report

    sections = [accuracy_section(plot_curves["eval/accuracy"])]
    passk_section, passk_plot, passk_data = passk_report(out_dir, dirs)
    if passk_plot is not None:
        sections.append(passk_section)
        plots.append(passk_plot)
    summary = {
        "methods": table,
        "runs": [asdict(s) for s in summaries],
        "plots": [str(Path(p).name) for p in plots],
    }
    if passk_data:
        summary["passk"] = passk_data
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = render_markdown(table, title, [Path(p).name for p in plots], sections)
    (out_dir / "report.md").write_text(markdown)
    return summary
