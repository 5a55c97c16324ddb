"""Length dynamics: how long correct and wrong completions are over training, and why.

The paper reports that under GRPO and F-ISFT+- wrong answers first shrink and then grow a lot,
while under F-ISFT+ they stay flat, and blames GRPO's per-sample 1/|o|: a wrong answer's negative
weight A- is spread over its |o| tokens, so each token of a long wrong answer is pushed down less.
`token_weights` makes that mechanism a number for each loss aggregation:

| aggregation | per-token weight of sample i | weight summed over its tokens |
|---|---|---|
| seq-mean   | A_i / (N L_i)    | A_i / N          (length-free: long = diluted) |
| token-mean | A_i / sum_j L_j  | A_i L_i / sum L  (longer = more weight) |
| constant   | A_i / (N C)      | A_i L_i / (N C)  (every token the same) |

(N samples in the batch, L_i tokens in sample i, C the constant divisor.) The other candidate cause,
training on negatives at all, is separated by comparing F-ISFT+ with F-ISFT+- under one aggregation
(`configs/compare-length-ablation.yaml`).

`analyze_lengths(run_dirs, out_dir)` reads runs' metrics.jsonl and samples.jsonl and writes tables
(returned as a dict) and plots. A run of a comparison (`runs/LABEL/seedN`) is named `LABEL/seedN`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rlino.analysis.report import SEED_DIR, parse_run_dir, run_name
from rlino.analysis.report import run_dirs as comparison_runs
from rlino.errors import UserError
from rlino.runlog import read_jsonl

AGGREGATIONS = ("seq-mean", "token-mean", "constant")

# ---------------------------------------------------------------- the mechanism, as pure functions


def token_weights(
    weights: Sequence[float],
    lengths: Sequence[int],
    aggregation: str,
    constant_length: int | None = None,
) -> list[float]:
    """The weight each token of sample i gets in the loss -sum_i w_i sum_t log pi(o_it).

    That is -d loss / d log pi(o_it) for the weighted likelihood (and for GRPO's clipped surrogate
    at ratio 1, where it is the same gradient). One value per sample; all its tokens share it.
    """
    if len(weights) != len(lengths):
        raise ValueError(f"{len(weights)} weights for {len(lengths)} lengths")
    if any(n < 1 for n in lengths):
        raise ValueError("every sample needs at least one token")
    n = len(lengths)
    if aggregation == "seq-mean":
        return [a / (n * length) for a, length in zip(weights, lengths, strict=True)]
    if aggregation == "token-mean":
        total = sum(lengths)
        return [a / total for a in weights]
    if aggregation == "constant":
        if constant_length is None or constant_length < 1:
            raise ValueError("aggregation 'constant' needs constant_length >= 1")
        return [a / (n * constant_length) for a in weights]
    raise ValueError(f"unknown aggregation {aggregation!r}; known: {', '.join(AGGREGATIONS)}")


def weight_vs_length(
    weight: float,
    lengths: Sequence[int],
    aggregation: str,
    *,
    mean_length: float,
    constant_length: int,
) -> list[float]:
    """Per-token weight (times N) of one sample of weight `weight` (A), as a function of its length.

    The sample sits in a large batch whose mean length is `mean_length`, so its own length barely
    moves the token-mean normaliser: seq-mean gives A / L, token-mean A / mean_length, constant
    A / C. Multiplying by N keeps the numbers batch-size free.
    """
    if aggregation == "seq-mean":
        return [weight / length for length in lengths]
    if aggregation == "token-mean":
        return [weight / mean_length for _ in lengths]
    if aggregation == "constant":
        return [weight / constant_length for _ in lengths]
    raise ValueError(f"unknown aggregation {aggregation!r}; known: {', '.join(AGGREGATIONS)}")


def grpo_wrong_advantage(p: float) -> float:
    """A- = -sqrt(p / (1 - p)) for binary rewards with a fraction p correct in the group."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    return -math.sqrt(p / (1.0 - p))


# ---------------------------------------------------------------- reading runs


def length_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(iteration, value) points of every length metric a run logged, by metric name."""
    keys = (
        "train/length_mean",
        "train/length_correct",
        "train/length_wrong",
        "eval/length_mean",
        "eval/length_correct",
        "eval/length_wrong",
    )
    return {
        key: [(int(r["iteration"]), float(r[key])) for r in rows if r.get(key) is not None]
        for key in keys
    }


def checkpoints(iterations: Sequence[int], points: int = 5) -> list[int]:
    """About `points` iterations spread evenly over a run's logged ones (always first and last)."""
    its = sorted(set(iterations))
    if len(its) <= points:
        return its
    picks = {its[round(k * (len(its) - 1) / (points - 1))] for k in range(points)}
    return sorted(picks)


def length_table(rows: list[dict[str, Any]], points: int = 5) -> list[dict[str, Any]]:
    """Train-sample lengths (correct, wrong, all) at a few iterations spread over the run."""
    by_it = {int(r["iteration"]): r for r in rows if r.get("iteration", 0) > 0}
    return [
        {
            "iteration": it,
            "length_correct": by_it[it].get("train/length_correct"),
            "length_wrong": by_it[it].get("train/length_wrong"),
            "length_mean": by_it[it].get("train/length_mean"),
            "accuracy": by_it[it].get("train/accuracy"),
        }
        for it in checkpoints(list(by_it), points)
    ]


def sample_lengths(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Lengths of the logged samples at the first and the last logged iteration, by correctness."""
    its = sorted({int(s["iteration"]) for s in samples})
    if not its:
        return {}

    def at(it: int) -> dict[str, Any]:
        mine = [s for s in samples if int(s["iteration"]) == it]
        return {
            "iteration": it,
            "correct": [int(s["length"]) for s in mine if s.get("correct")],
            "wrong": [int(s["length"]) for s in mine if not s.get("correct")],
        }

    return {"start": at(its[0]), "end": at(its[-1])}


def _run_settings(run_dir: Path) -> tuple[str, int]:
    """(aggregation, max_new_tokens) from a run's config.yaml (defaults if unreadable)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return "seq-mean", 128
    data = yaml.safe_load(path.read_text()) or {}
    method = data.get("method", {}) or {}
    rollout = data.get("rollout", {}) or {}
    return str(method.get("aggregation", "seq-mean")), int(rollout.get("max_new_tokens", 128))


def _table_lengths(cap: int) -> list[int]:
    """1, 2, 4, ... up to the cap, and the cap itself."""
    out = [2**k for k in range(cap.bit_length()) if 2**k <= cap]
    return out if out[-1] == cap else [*out, cap]


def display_name(run_dir: Path) -> str:
    """`grpo/seed0` for a run of a comparison (`runs/grpo/seed0`), else the directory's name."""
    return run_name(*parse_run_dir(run_dir)) if SEED_DIR.match(run_dir.name) else run_dir.name


def _curve(points: list[tuple[int, float]]) -> dict[str, list[float]]:
    return {
        "iteration": [float(i) for i, _ in points],
        "mean": [v for _, v in points],
        "std": [0.0] * len(points),
        "n": [1.0] * len(points),
    }


def analyze_lengths(
    run_dirs: Sequence[Path], out_dir: Path, wrong_fraction_correct: float = 0.25
) -> dict[str, Any]:
    """Tables and plots of length dynamics for `run_dirs`; plots go to `out_dir`.

    Writes lengths_over_time.png (train correct vs wrong per run), length_distribution.png
    (logged samples at the first vs last logged iteration) and weight_vs_length.png (per-token
    weight of a wrong answer under each aggregation, for a group with `wrong_fraction_correct`
    of its samples right).
    """
    from rlino.analysis.plots import correct_vs_wrong_plot, histogram_plot

    if not run_dirs:
        raise UserError("give at least one run directory")
    runs: dict[str, Any] = {}
    correct_curves, wrong_curves = {}, {}
    histograms: dict[str, list[float]] = {}
    mean_lengths, caps = [], []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not (run_dir / "metrics.jsonl").is_file():
            raise UserError(f"{run_dir} has no metrics.jsonl (not a run directory)")
        name = display_name(run_dir)
        rows = read_jsonl(run_dir / "metrics.jsonl")
        series = length_series(rows)
        samples = sample_lengths(read_jsonl(run_dir / "samples.jsonl"))
        aggregation, cap = _run_settings(run_dir)
        runs[name] = {
            "aggregation": aggregation,
            "table": length_table(rows),
            "eval": {
                key: series[f"eval/{key}"]
                for key in ("length_correct", "length_wrong", "length_mean")
            },
            "samples": samples,
        }
        correct_curves[name] = _curve(series["train/length_correct"])
        wrong_curves[name] = _curve(series["train/length_wrong"])
        for when in ("start", "end"):
            if when in samples:
                it = samples[when]["iteration"]
                for kind in ("correct", "wrong"):
                    histograms[f"{name} it{it} {kind}"] = samples[when][kind]
        mean_lengths += [v for _, v in series["train/length_mean"]]
        caps.append(cap)

    out_dir = Path(out_dir)
    plots = [
        correct_vs_wrong_plot(
            correct_curves,
            wrong_curves,
            out_dir / "lengths_over_time.png",
            title="Training-sample length: correct (solid) vs wrong (dashed)",
        ),
        histogram_plot(
            histograms,
            out_dir / "length_distribution.png",
            title="Logged sample lengths, first vs last logged iteration",
            xlabel="completion tokens",
        ),
    ]
    mean_length = sum(mean_lengths) / len(mean_lengths) if mean_lengths else 60.0
    plot, mechanism = weight_mechanism(
        grpo_wrong_advantage(wrong_fraction_correct), mean_length, max(caps), out_dir
    )
    return {"runs": runs, "mechanism": mechanism, "plots": [str(p) for p in [*plots, plot]]}


def weight_mechanism(
    a_wrong: float, mean_length: float, cap: int, out_dir: Path
) -> tuple[Path, dict[str, Any]]:
    """The per-token weight of a wrong answer vs its length under each aggregation: plot and table."""
    from rlino.analysis.plots import xy_plot

    lengths = list(range(1, cap + 1))
    mechanism = {
        agg: weight_vs_length(a_wrong, lengths, agg, mean_length=mean_length, constant_length=cap)
        for agg in AGGREGATIONS
    }
    plot = xy_plot(
        {agg: (lengths, [abs(w) for w in ws]) for agg, ws in mechanism.items()},
        out_dir / "weight_vs_length.png",
        title=(
            "Per-token push-down of a wrong answer\n"
            f"(A- = {a_wrong:.2f}, batch mean length {mean_length:.0f}, C = {cap})"
        ),
        xlabel="length of the wrong answer (tokens)",
        ylabel="|per-token weight| x N",
        logy=True,
    )
    return plot, {
        "advantage_wrong": a_wrong,
        "mean_length": mean_length,
        "constant_length": cap,
        "per_token_weight_at": {
            agg: {str(length): mechanism[agg][length - 1] for length in _table_lengths(cap)}
            for agg in AGGREGATIONS
        },
    }


def _seed_runs(label_dir: Path) -> list[Path]:
    """The `seedN` runs (with metrics) in a comparison's `runs/LABEL` directory, by seed."""
    found = [
        d for d in label_dir.iterdir() if SEED_DIR.match(d.name) and (d / "metrics.jsonl").is_file()
    ]
    return sorted(found, key=lambda d: parse_run_dir(d)[1])


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories from the arguments, each at most once.

    An argument is a run directory, a comparison's `runs/LABEL` directory (its `seedN` runs), or
    a `rlino compare` directory (all its runs, in the comparison's order).
    """
    dirs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"{p} is not a directory")
        if (p / "metrics.jsonl").is_file():
            dirs.append(p)
        elif (p / "runs").is_dir():
            dirs += comparison_runs(p)
        elif seeds := _seed_runs(p):
            dirs += seeds
        else:
            raise UserError(
                f"{p} is neither a run directory, a comparison's runs/LABEL directory "
                "nor a `rlino compare` directory"
            )
    if not dirs:
        raise UserError("no runs with metrics.jsonl found")
    return list(dict.fromkeys(dirs))


def default_out(first: Path, first_run: Path) -> Path:
    """Where plots go without --out: the comparison's `lengths/`, or `lengths/` beside the run.

    A comparison's plots go beside its `runs/`, not inside, so a later `runs/*` glob skips them.
    """
    if (first / "runs").is_dir():
        return first / "lengths"
    label_dir = first_run.parent
    if SEED_DIR.match(first_run.name) and label_dir.parent.name == "runs":
        return label_dir.parent.parent / "lengths"
    return label_dir / "lengths"


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def lengths_command(*, run_dirs: list[str], out: str | None, json_out: bool) -> dict[str, Any]:
    """Body of `rlino analyze lengths`: tables on the console, plots in --out.

    The default --out is the comparison's `lengths/` when the runs belong to one, else `lengths/`
    beside the first run (`default_out`).
    """
    import json

    from rich.console import Console
    from rich.table import Table

    dirs = expand_run_dirs(run_dirs)
    out_dir = Path(out) if out else default_out(Path(run_dirs[0]), dirs[0])
    result = analyze_lengths(dirs, out_dir)
    console = Console()
    for name, run in result["runs"].items():
        table = Table(title=f"{name} ({run['aggregation']}): training-sample lengths (tokens)")
        for col in ("iteration", "train accuracy", "correct", "wrong", "all"):
            table.add_column(col, justify="right")
        for row in run["table"]:
            table.add_row(
                str(row["iteration"]),
                _num(row["accuracy"], 3),
                _num(row["length_correct"]),
                _num(row["length_wrong"]),
                _num(row["length_mean"]),
            )
        console.print(table)
        ev = run["eval"]
        if ev["length_correct"] or ev["length_wrong"]:
            first = {k: (v[0][1] if v else None) for k, v in ev.items()}
            last = {k: (v[-1][1] if v else None) for k, v in ev.items()}
            console.print(
                f"  eval (greedy) correct {_num(first['length_correct'])} -> "
                f"{_num(last['length_correct'])}, wrong {_num(first['length_wrong'])} -> "
                f"{_num(last['length_wrong'])}",
                highlight=False,
            )
    mech = result["mechanism"]
    table = Table(
        title=(
            f"Per-token weight x N of a wrong answer (A- = {mech['advantage_wrong']:.3f}), "
            f"batch mean length {mech['mean_length']:.0f}, C = {mech['constant_length']}"
        )
    )
    table.add_column("length", justify="right")
    for agg in AGGREGATIONS:
        table.add_column(agg, justify="right")
    per = mech["per_token_weight_at"]
    for length in per["seq-mean"]:
        table.add_row(length, *(f"{per[agg][length]:.4f}" for agg in AGGREGATIONS))
    console.print(table)
    console.print(
        "seq-mean spreads A- over the answer's own length: a long wrong answer is pushed down "
        "less per token; token-mean and constant push every token alike.",
        highlight=False,
    )
    console.print(f"plots: {', '.join(result['plots'])}", highlight=False)
    if json_out:
        print(json.dumps(result), flush=True)
    return result
