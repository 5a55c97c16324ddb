"""pass@k of a comparison's models: n samples at temperature T on a fixed subset of test prompts.

Greedy accuracy says how often a model's single best guess is right; pass@k for large k says
whether the right answer is still among what it samples. Negative-only training (NSR) is reported
to keep or widen that coverage while positive-only training narrows it (Zhu et al. 2025, arXiv
2506.01347), so a comparison of weightings measures both.

With `passk: {n: 64, prompts: 100}` in a compare config, `rlino compare` evaluates each finished
run's `final/` model and each base model once: n samples per prompt on the first `prompts` test
examples, with the run's task, template, completion cap and sampling backend, through
`rlino.evaluate.evaluate` (the evaluator `rlino eval` uses). The estimator is the unbiased one of
Chen et al. 2021, `rlino.metrics.pass_at_k` (a product, no huge binomials), averaged over prompts,
for k = 1, 2, 4, ..., n. Each result goes to a JSON file (`runs/LABEL/seedN/passk.json`,
`base_passk/BASE.json`) with the per-prompt correct counts, so any k can be recomputed; an
existing file with the same settings is not evaluated again (resumable).

`passk_report(out_dir, run_dirs)` gathers the files into a report section: pass@k per method,
mean and 95% t interval over seeds, and `passk.png` (pass@k against k on a log2 axis, one panel
per base model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlino.errors import UserError
from rlino.metrics import pass_at_k

if TYPE_CHECKING:
    from rlino.config import TrainConfig

PASSK_FILE = "passk.json"
"""A run's pass@k, beside its metrics.jsonl."""
BASE_PASSK_DIR = "base_passk"
"""Where a comparison keeps its base models' pass@k, one `BASE.json` each."""
BASE_SEED = 0
"""Sampling seed of a base model's evaluation (a run's is the run's seed)."""
SHOWN = ("n", "prompts", "prompts_used", "temperature")
"""The settings the report states."""
BASE_SEP = "@"
"""A run label on a grid with several bases is METHOD@BASE (labels never hold '@')."""


@dataclass(frozen=True)
class PasskSpec:
    """How pass@k is measured at the end of each run of a comparison."""

    n: int = 64
    """samples per prompt"""
    prompts: int = 100
    """the first N test examples"""
    temperature: float = 1.0
    """sampling temperature"""
    batch_rows: int = 512
    """samples drawn per sampling batch (prompts per batch = batch_rows // n, at least 1)"""

    def ks(self) -> list[int]:
        """k = 1, 2, 4, ... up to n, and n itself."""
        out, k = [], 1
        while k < self.n:
            out.append(k)
            k *= 2
        return [*out, self.n]

    def settings(self) -> dict[str, Any]:
        """What a stored result must match to be reused."""
        return {"n": self.n, "prompts": self.prompts, "temperature": self.temperature}


def parse_passk(value: Any) -> PasskSpec | None:
    """A compare config's `passk:`: absent/false = off, true = defaults, or a mapping of fields."""
    from rlino.config import from_dict

    if value is None or value is False:
        return None
    if value is True:
        return PasskSpec()
    if not isinstance(value, dict):
        raise UserError(f"passk must be true, false or a mapping {{n, prompts}}, got {value!r}")
    spec: PasskSpec = from_dict(PasskSpec, value, "passk")
    if spec.n < 1 or spec.prompts < 1 or spec.batch_rows < 1:
        raise UserError(
            f"passk.n, passk.prompts and passk.batch_rows must be >= 1 (got {spec.n}, "
            f"{spec.prompts}, {spec.batch_rows})"
        )
    if spec.temperature <= 0:
        raise UserError(f"passk.temperature must be > 0 (got {spec.temperature})")
    return spec


def pass_at_curve(correct_counts: Sequence[int], n: int, ks: Sequence[int]) -> dict[int, float]:
    """Mean over prompts of the unbiased pass@k, for each k, from each prompt's correct count."""
    if not correct_counts:
        raise ValueError("no prompts")
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}


def evaluate_passk(
    model_dir: str | Path,
    config: TrainConfig,
    spec: PasskSpec,
    seed: int,
    *,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """pass@k of the model in `model_dir` on the task, template and sampling settings of `config`."""
    from rlino.evaluate import evaluate
    from rlino.policy import load_policy
    from rlino.setup import target_of
    from rlino.tasks import get_task

    target = target_of(config)
    task = get_task(target.task, **target.task_options)
    template = target.template or task.default_template
    examples = task.examples("test")[: spec.prompts]
    if not examples:
        raise UserError(f"task {target.task!r} has no test examples for pass@k")
    policy = load_policy(
        str(model_dir), gguf_file=gguf_file, device=config.model.device, dtype=config.model.dtype
    )
    policy.model.eval()
    start = time.perf_counter()
    report = evaluate(
        policy,
        task,
        examples,
        template=template,
        samples=spec.n,
        temperature=spec.temperature,
        top_p=config.rollout.top_p,
        max_new_tokens=config.rollout.max_new_tokens,
        batch_size=max(1, spec.batch_rows // spec.n),
        seed=seed,
        backend=config.rollout.backend,
    )
    counts = [0] * len(examples)
    for c in report.completions:
        counts[c.index] += int(c.correct)
    curve = pass_at_curve(counts, spec.n, spec.ks())
    return {
        **spec.settings(),
        "prompts_used": len(examples),
        "seed": seed,
        "model": str(model_dir),
        "pass_at": {str(k): v for k, v in curve.items()},
        "mean_accuracy": report.accuracy,
        "correct_counts": counts,
        "seconds": round(time.perf_counter() - start, 1),
    }


def stored(path: Path, spec: PasskSpec) -> dict[str, Any] | None:
    """The result in `path` if it was measured with `spec`'s settings, else None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None  # a torn file: measure again
    same = all(data.get(k) == v for k, v in spec.settings().items())
    return data if same else None


def ensure_passk(
    path: Path,
    model_dir: str | Path,
    config: TrainConfig,
    spec: PasskSpec,
    seed: int,
    *,
    gguf_file: str | None = None,
) -> bool:
    """Measure pass@k into `path` unless it already holds a result with these settings; returns
    whether it measured. Written atomically (a killed evaluation leaves no file)."""
    if stored(path, spec) is not None:
        return False
    result = evaluate_passk(model_dir, config, spec, seed, gguf_file=gguf_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    return True


# ---------------------------------------------------------------- the report section


def split_label(label: str) -> tuple[str, str | None]:
    """`grpo@weak` -> ("grpo", "weak"); `grpo` -> ("grpo", None)."""
    method, sep, base = label.partition(BASE_SEP)
    return (method, base) if sep else (label, None)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def _base_files(out_dir: Path) -> list[Path]:
    """The base models' pass@k files, in the order the comparison lists its bases."""
    order: list[str] = []
    record = _read(out_dir / "compare.json")
    if record is not None:
        order = [b.get("label") for b in record.get("spec", {}).get("bases") or []]
    rank = {label: i for i, label in enumerate(order)}
    files = (out_dir / BASE_PASSK_DIR).glob("*.json")
    return sorted(files, key=lambda p: (rank.get(p.stem, len(rank)), p.stem))


def passk_report(
    out_dir: Path, run_dirs: Sequence[Path]
) -> tuple[str, Path | None, dict[str, Any]]:
    """(markdown section, plot path, summary data) of the pass@k files of a comparison; the
    section is empty and the plot None when no run has one."""
    from rlino.analysis.report import parse_run_dir
    from rlino.analysis.seed_stats import seed_stats

    by_label: dict[str, dict[int, dict[str, float]]] = {}
    settings: dict[str, Any] = {}
    for run_dir in run_dirs:
        data = _read(run_dir / PASSK_FILE)
        if data is None:
            continue
        label, seed = parse_run_dir(run_dir)
        by_label.setdefault(label, {})[seed] = data["pass_at"]
        settings = {k: data.get(k) for k in SHOWN}
    bases: dict[str, dict[str, float]] = {}
    for path in _base_files(out_dir):
        data = _read(path)
        if data is not None:
            bases[path.stem] = data["pass_at"]
            settings = settings or {k: data.get(k) for k in SHOWN}
    if not by_label and not bases:
        return "", None, {}
    ks = sorted({int(k) for runs in by_label.values() for c in runs.values() for k in c})
    ks = ks or sorted({int(k) for c in bases.values() for k in c})
    table: dict[str, dict[str, Any]] = {}
    for name, curve in bases.items():
        table[f"base{BASE_SEP}{name}" if name != "base" else "base"] = {
            "seeds": [BASE_SEED],
            **{str(k): asdict(seed_stats([curve[str(k)]])) for k in ks if str(k) in curve},
        }
    for label, runs in by_label.items():
        entry: dict[str, Any] = {"seeds": sorted(runs)}
        for k in ks:
            stats = seed_stats([c[str(k)] for c in runs.values() if str(k) in c])
            entry[str(k)] = None if stats is None else asdict(stats)
        table[label] = entry
    plot = passk_plot(table, ks, out_dir / "passk.png")
    section = render_section(table, ks, settings)
    return section, plot, {"settings": settings, "ks": ks, "methods": table}


def render_section(table: dict[str, dict[str, Any]], ks: Sequence[int], settings: dict) -> str:
    """The markdown table: one row per label, one column per k (%), mean [95% t interval]."""
    prompts = settings.get("prompts_used") or settings.get("prompts")
    from rlino.analysis.seed_stats import SeedStats

    lines = [
        "## pass@k",
        "",
        f"Unbiased pass@k (Chen et al. 2021) from n = {settings.get('n')} samples at temperature "
        f"{settings.get('temperature')} on the first {prompts} test prompts, in "
        "%: mean over seeds [95% t interval]; base rows: the model before training (one seed).",
        "",
        "| method | seeds | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for label, entry in table.items():
        cells = []
        for k in ks:
            stats = entry.get(str(k))
            if stats is None:
                cells.append("-")
                continue
            s = SeedStats(**stats)
            ci = "" if s.ci_low is None else f" [{100 * s.ci_low:.1f}, {100 * s.ci_high:.1f}]"
            cells.append(f"{100 * s.mean:.1f}{ci}")
        seeds = ",".join(str(s) for s in entry["seeds"])
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def passk_plot(table: dict[str, dict[str, Any]], ks: Sequence[int], path: Path) -> Path:
    """pass@k against k (log2 axis), one line per method with its 95% band, one panel per base."""
    from rlino.analysis.plots import _pyplot, _save

    groups: dict[str | None, list[str]] = {}
    for label in table:
        groups.setdefault(split_label(label)[1], []).append(label)
    plt = _pyplot()
    panels = list(groups)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True
    )
    for ax, base in zip(axes[0], panels, strict=True):
        for label in groups[base]:
            entry = table[label]
            xs = [k for k in ks if entry.get(str(k))]
            mean = [100 * entry[str(k)]["mean"] for k in xs]
            is_base = split_label(label)[0] == "base"
            name = "base" if is_base else split_label(label)[0]
            style = {"color": "black", "linestyle": "--"} if is_base else {}
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=name, **style)
            lo = [entry[str(k)]["ci_low"] for k in xs]
            hi = [entry[str(k)]["ci_high"] for k in xs]
            if all(v is not None for v in lo + hi):
                ax.fill_between(
                    xs,
                    [100 * v for v in lo],
                    [100 * v for v in hi],
                    color=line.get_color(),
                    alpha=0.12,
                    linewidth=0,
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_title(f"base {base}" if base else "pass@k", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("pass@k (%)")
    return _save(fig, path)
