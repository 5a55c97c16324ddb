"""Small PNG plots with matplotlib's Agg backend (no display needed).

Every function takes plain numbers (curves as lists) and a path, so the plots can be redrawn from
`summary.json`-like data without a model or a run in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

Curve = dict[str, list[float]]
"""{"iteration": [...], "mean": [...], "std": [...], "n": [...]} as made by report.curves."""

FIGSIZE = (6.0, 3.8)
DPI = 90


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax: Any, curve: Curve, label: str, scale: float = 1.0, **style: Any) -> None:
    """A mean line with a ± std band (the band is drawn only where 2+ seeds contributed)."""
    x = curve["iteration"]
    mean = [m * scale for m in curve["mean"]]
    (line,) = ax.plot(x, mean, label=label, marker="o" if len(x) <= 12 else None, ms=3, **style)
    if any(n > 1 for n in curve.get("n", [])):
        lo = [(m - s) * scale for m, s in zip(curve["mean"], curve["std"], strict=True)]
        hi = [(m + s) * scale for m, s in zip(curve["mean"], curve["std"], strict=True)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)


def _integer_iterations(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def line_plot(
    curves: dict[str, Curve], path: Path, *, title: str, ylabel: str, scale: float = 1.0
) -> Path:
    """One line per label (mean over seeds, band = ± std) against the iteration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for label, curve in curves.items():
        if curve["iteration"]:
            _band(ax, curve, label, scale)
    ax.set_xlabel("iteration")
    _integer_iterations(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, path)


def correct_vs_wrong_plot(
    correct: dict[str, Curve], wrong: dict[str, Curve], path: Path, *, title: str
) -> Path:
    """One panel per label: mean length of correct (solid) and wrong (dashed) completions."""
    plt = _pyplot()
    labels = list(dict.fromkeys([*correct, *wrong]))
    cols = min(3, max(1, len(labels)))
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True
    )
    for ax, label in zip(axes.flat, labels, strict=False):
        if label in correct and correct[label]["iteration"]:
            _band(ax, correct[label], "correct", color="tab:green")
        if label in wrong and wrong[label]["iteration"]:
            _band(ax, wrong[label], "wrong", color="tab:red", linestyle="--")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        _integer_iterations(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("tokens")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def comparison_plots(curves: dict[str, dict[str, Curve]], out_dir: Path) -> list[Path]:
    """accuracy.png, lengths.png and reward.png of a comparison (curves keyed by metric name)."""
    return [
        line_plot(
            curves["eval/accuracy"],
            out_dir / "accuracy.png",
            title="Test accuracy (greedy pass@1)",
            ylabel="accuracy (%)",
            scale=100.0,
        ),
        correct_vs_wrong_plot(
            curves["train/length_correct"],
            curves["train/length_wrong"],
            out_dir / "lengths.png",
            title="Training-sample length: correct vs wrong",
        ),
        line_plot(
            curves["train/reward_mean"],
            out_dir / "reward.png",
            title="Mean training reward",
            ylabel="reward",
        ),
    ]


def histogram_plot(
    groups: dict[str, Sequence[float]], path: Path, *, title: str, xlabel: str
) -> Path:
    """Overlaid step histograms (one per named group) on shared bins."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    values = [v for vs in groups.values() for v in vs]
    if values:
        lo, hi = min(values), max(values)
        bins = max(1, min(30, int(hi - lo) + 1))
        for name, vs in groups.items():
            if vs:
                ax.hist(vs, bins=bins, range=(lo, hi + 1), histtype="step", label=name, lw=1.5)
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def xy_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
) -> Path:
    """Plain lines y(x), one per named series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
