"""Comparison reports: per-run summaries, statistics over seeds, `report.md` and `summary.json`.

A comparison directory holds one run per (method, seed) under `runs/LABEL-sSEED/` (see
`rlino.analysis.compare`). Everything here reads only what the runs wrote (`config.yaml`,
`metrics.jsonl`, `wall_time.json`), so `write_report(out_dir)` can regenerate the report and the
plots at any time, also while some runs are still missing.

Statistics are over seeds: mean, sample standard deviation (n - 1) and a two-sided confidence
interval from Student's t distribution (exact t quantiles for integer degrees of freedom; no
SciPy needed). With a single seed there is no spread, and the report says n=1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlino.errors import UserError
from rlino.runlog import read_jsonl

RUN_NAME = re.compile(r"^(?P<label>.+)-s(?P<seed>-?\d+)$")
"""Run directories are named LABEL-sSEED."""
WALL_TIME_FILE = "wall_time.json"
"""Written by `run_compare` beside each run: seconds spent in train() over all invocations."""

# ---------------------------------------------------------------- statistics


def t_two_sided_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1 (closed form, Abramowitz-Stegun 26.7).

    With theta = atan(t / sqrt(df)): odd df sums odd powers of cos(theta) on top of theta, even df
    sums even powers; both series are finite, so the value is exact up to float rounding.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            if k > 1:
                term *= c * c * (2 * k - 2) / (2 * k - 1)
            total += term
        return (2.0 / math.pi) * (theta + s * total)
    total, term = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = `confidence` (e.g. 0.95 -> 12.706 for df 1, 2.776 for df 4)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while t_two_sided_coverage(hi, df) < confidence:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_coverage(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class SeedStats:
    """Mean, spread and confidence interval of one number over n seeds."""

    n: int
    mean: float
    std: float | None
    """sample standard deviation (n - 1); None for n = 1"""
    ci_low: float | None
    ci_high: float | None
    """two-sided t interval for the mean; None for n = 1"""
    confidence: float = 0.95

    def text(self, digits: int = 1, scale: float = 1.0) -> str:
        """`mean ± std [lo, hi]`, or `mean (n=1)`; values multiplied by `scale` (100 for %)."""
        mean = f"{self.mean * scale:.{digits}f}"
        if self.std is None or self.ci_low is None or self.ci_high is None:
            return f"{mean} (n=1)"
        return (
            f"{mean} ± {self.std * scale:.{digits}f} "
            f"[{self.ci_low * scale:.{digits}f}, {self.ci_high * scale:.{digits}f}]"
        )


def seed_stats(values: Sequence[float], confidence: float = 0.95) -> SeedStats | None:
    """Statistics of `values` (one per seed): None when there are none."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return SeedStats(1, mean, None, None, None, confidence)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return SeedStats(n, mean, std, mean - half, mean + half, confidence)


# ---------------------------------------------------------------- one run


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
        tokens_sampled=int(sum(r.get("tokens/sampled", 0) or 0 for r in train_rows)),
    )


def parse_run_name(name: str) -> tuple[str, int]:
    """`grpo-token-mean-s2` -> ("grpo-token-mean", 2)."""
    match = RUN_NAME.match(name)
    if match is None:
        raise UserError(f"run directory {name!r} is not named LABEL-sSEED")
    return match["label"], int(match["seed"])


def summarize_run(run_dir: Path) -> RunSummary:
    """Read one run directory (`LABEL-sSEED/`) into a RunSummary."""
    label, seed = parse_run_name(run_dir.name)
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


def render_markdown(table: dict[str, dict[str, Any]], title: str, plots: Sequence[str]) -> str:
    """report.md: the accuracy table, the length table, costs, and links to the plots."""
    lines = [
        f"# {title}",
        "",
        "Greedy pass@1 on the fixed test subset, in %. Mean ± sample std over seeds, "
        "[95% t confidence interval]; n=1 means a single seed (no spread).",
        "",
        "| method | seeds | final accuracy | start (base) | gain over base |",
        "|---|---|---|---|---|",
    ]
    for label, e in table.items():
        seeds = ",".join(str(s) for s in e["seeds"])
        lines.append(
            f"| {label} | {seeds} | {_fmt(e['final_accuracy'], 1, 100)} | "
            f"{_mean(e['start_accuracy'], 1, 100)} | {_fmt(e['gain'], 1, 100)} |"
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
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def run_dirs(out_dir: Path) -> list[Path]:
    """The run directories of a comparison (those with a metrics.jsonl), in spec order if known."""
    runs = out_dir / "runs"
    if not runs.is_dir():
        raise UserError(f"{out_dir} holds no runs/ directory (not a `rlino compare` output)")
    found = [p for p in runs.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file()]
    order: list[str] = []
    spec_file = out_dir / "compare.json"
    if spec_file.is_file():
        order = json.loads(spec_file.read_text()).get("run_names", [])
    rank = {name: i for i, name in enumerate(order)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def write_report(out_dir: Path, title: str = "rlino comparison") -> dict[str, Any]:
    """(Re)write report.md, summary.json and the plots of a comparison directory; returns the summary."""
    from rlino.analysis.plots import comparison_plots

    out_dir = Path(out_dir)
    dirs = run_dirs(out_dir)
    if not dirs:
        raise UserError(f"no runs with metrics under {out_dir / 'runs'} yet")
    summaries = [summarize_run(d) for d in dirs]
    rows_by_run = {parse_run_name(d.name): read_jsonl(d / "metrics.jsonl") for d in dirs}
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
    summary = {
        "methods": table,
        "runs": [asdict(s) for s in summaries],
        "plots": [str(Path(p).name) for p in plots],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = render_markdown(table, title, [Path(p).name for p in plots])
    (out_dir / "report.md").write_text(markdown)
    return summary
