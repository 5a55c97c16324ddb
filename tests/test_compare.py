"""Comparison reports (statistics on synthetic metrics) and `rlino compare` on the tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from toy_tasks import letter_task

from rlino.analysis.compare import (
    CompareSpec,
    load_spec,
    run_compare,
    run_config,
    spec_from_dict,
    spec_from_flags,
)
from rlino.analysis.report import curves, summarize_rows, write_report
from rlino.analysis.seed_stats import seed_stats, t_quantile
from rlino.errors import UserError

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)],
)
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_seed_stats_by_hand() -> None:
    s = seed_stats([0.5, 0.6, 0.7])
    assert s is not None
    assert s.mean == pytest.approx(0.6)
    assert s.std == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n)
    assert s.ci_low == pytest.approx(0.6 - half, abs=1e-6)
    assert s.ci_high == pytest.approx(0.6 + half, abs=1e-6)
    assert s.text(1, 100) == "60.0 ± 10.0 [35.2, 84.8]"
    one = seed_stats([0.25])
    assert one is not None and one.std is None and one.text(1, 100) == "25.0 (n=1)"
    assert seed_stats([]) is None


def _rows(start: float, end: float, wrong_len: float, iterations: int = 4) -> list[dict]:
    rows = [
        {
            "iteration": 0,
            "eval/accuracy": start,
            "eval/length_correct": 20.0,
            "eval/length_wrong": 30.0,
        }
    ]
    for it in range(1, iterations + 1):
        row = {
            "iteration": it,
            "train/reward_mean": 0.1 * it,
            "train/length_correct": 20.0,
            "train/length_wrong": wrong_len + it,
            "time/rollout_s": 1.0,
            "time/update_s": 0.5,
            "train/sampled_tokens": 100,
        }
        if it in (2, iterations):
            row.update(
                {
                    "eval/accuracy": start + (end - start) * it / iterations,
                    "eval/length_correct": 22.0,
                    "eval/length_wrong": wrong_len,
                }
            )
        rows.append(row)
    return rows


def test_summarize_rows() -> None:
    s = summarize_rows(_rows(0.1, 0.3, 40.0), "grpo", 0, finished=True)
    assert s.start_accuracy == 0.1 and s.final_accuracy == pytest.approx(0.3)
    assert s.gain == pytest.approx(0.2)
    assert (s.start_length_wrong, s.end_length_wrong) == (30.0, 40.0)
    assert (s.train_length_wrong_first, s.train_length_wrong_last) == (41.0, 44.0)
    assert s.wall_s == pytest.approx(6.0) and s.tokens_sampled == 400
    assert s.iterations == 4
    assert s.weight_sum_mean is None  # not logged by these rows


def test_weights_section_averages_over_iterations_then_seeds(tmp_path: Path) -> None:
    for seed, shift in enumerate([0.0, 0.2]):
        rows = _rows(0.1, 0.3, 40.0)
        for row in rows[1:]:  # iterations 1..4: weight sums -1, -0.5, 0, 0.5 (+ shift)
            row["train/weight_sum_mean"] = -1.5 + 0.5 * row["iteration"] + shift
            row["train/accuracy"] = 0.1 * row["iteration"]
        _write_run(tmp_path, f"fisft+-/seed{seed}", rows)
    _write_run(tmp_path, "grpo/seed0", _rows(0.1, 0.3, 40.0))  # no weight metrics: no row
    summary = write_report(tmp_path)
    entry = summary["methods"]["fisft+-"]
    assert entry["weight_sum_mean"]["mean"] == pytest.approx(-0.15)  # (-0.25 + -0.05) / 2
    assert entry["train_accuracy_mean"]["mean"] == pytest.approx(0.25)
    report = (tmp_path / "report.md").read_text()
    assert "| fisft+- | -0.150 ± 0.141" in report
    assert "| grpo | " not in report.split("## Weights")[1].split("##")[0]


def test_curves_mean_and_std_over_seeds() -> None:
    rows = {("a", 0): _rows(0.1, 0.3, 40.0), ("a", 1): _rows(0.1, 0.5, 40.0)}
    c = curves(rows, "eval/accuracy")["a"]
    assert c["iteration"] == [0.0, 2.0, 4.0]
    assert c["mean"] == pytest.approx([0.1, 0.25, 0.4])
    assert c["std"][2] == pytest.approx(math.sqrt(0.02))  # (0.3, 0.5): std 0.1414
    assert c["n"] == [2.0, 2.0, 2.0]


def _write_run(root: Path, name: str, rows: list[dict], finished: bool = True) -> None:
    run = root / "runs" / name  # name: LABEL/seedN
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run / "final").mkdir()


def test_write_report_on_synthetic_runs(tmp_path: Path) -> None:
    for seed, end in enumerate([0.30, 0.40, 0.50]):
        _write_run(tmp_path, f"grpo/seed{seed}", _rows(0.10, end, 40.0))
    _write_run(tmp_path, "fisft+/seed0", _rows(0.10, 0.20, 30.0))
    _write_run(tmp_path, "fisft+-/seed0", _rows(0.10, 0.05, 30.0))
    summary = write_report(tmp_path)
    grpo = summary["methods"]["grpo"]
    assert grpo["seeds"] == [0, 1, 2]
    assert grpo["final_accuracy"]["mean"] == pytest.approx(0.40)
    assert grpo["final_accuracy"]["std"] == pytest.approx(0.10)
    half = 4.302653 * 0.10 / math.sqrt(3)
    assert grpo["final_accuracy"]["ci_high"] == pytest.approx(0.40 + half, abs=1e-6)
    assert grpo["gain"]["mean"] == pytest.approx(0.30)
    assert summary["methods"]["fisft+"]["final_accuracy"]["std"] is None
    # runs/fisft+-/seed0 is F-ISFT+- (seed 0), never F-ISFT+ with a "-s0" suffix
    assert summary["methods"]["fisft+"]["final_accuracy"]["mean"] == pytest.approx(0.20)
    assert summary["methods"]["fisft+-"]["final_accuracy"]["mean"] == pytest.approx(0.05)
    report = (tmp_path / "report.md").read_text()
    assert "| grpo | 0,1,2 | 40.0 ± 10.0 [15.2, 64.8] | 10.0 | 30.0 ± 10.0" in report
    assert "20.0 (n=1)" in report
    for name in ("accuracy.png", "lengths.png", "reward.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["methods"].keys() == {
        "grpo",
        "fisft+",
        "fisft+-",
    }


def test_write_report_needs_runs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no runs"):
        write_report(tmp_path)


def test_old_flat_layout_is_refused_not_mixed(tmp_path: Path) -> None:
    _write_run(tmp_path, "grpo/seed0", _rows(0.10, 0.30, 40.0))
    _write_run(tmp_path, "fisft+-s0", _rows(0.10, 0.20, 30.0))  # runs/LABEL-sSEED, the old layout
    with pytest.raises(UserError, match="old layout") as err:
        write_report(tmp_path)
    assert "\n" not in str(err.value)
    spec = spec_from_dict({"methods": ["grpo"], "train": {"iterations": 1}})
    with pytest.raises(UserError, match="old layout"):
        run_compare(spec, tmp_path, progress=False, train_fn=lambda *a, **k: None)


# ---------------------------------------------------------------- specs


def test_spec_parsing_and_errors() -> None:
    spec = spec_from_dict(
        {
            "methods": ["grpo", {"label": "grpo-tm", "name": "grpo", "aggregation": "token-mean"}],
            "seeds": [0, 1],
            "train": {"iterations": 3},
        }
    )
    assert spec.run_names() == ["grpo/seed0", "grpo/seed1", "grpo-tm/seed0", "grpo-tm/seed1"]
    unnamed = spec_from_dict(
        {"methods": [{"name": "grpo", "aggregation": "token-mean"}, {"name": "grpo", "beta": 0.04}]}
    )
    assert [m.label for m in unnamed.methods] == ["grpo-token-mean", "grpo-beta0.04"]
    with pytest.raises(UserError, match="unknown method"):
        spec_from_dict({"methods": ["nope"]})
    with pytest.raises(UserError, match="unknown key"):
        spec_from_dict({"methods": [{"name": "grpo", "agg": "x"}]})
    with pytest.raises(UserError, match="distinct"):
        spec_from_dict({"methods": ["grpo", "grpo"]})
    with pytest.raises(UserError, match="cannot hold '/'") as err:
        spec_from_dict({"methods": [{"label": "grpo/tm", "name": "grpo"}]})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown config key"):
        spec_from_dict({"methods": ["grpo"], "train": {"itrations": 3}})
    flags = spec_from_flags(
        spec, methods="grpo,fisft+", seeds="3", iterations=7, overrides=["optim.lr=1e-3"]
    )
    assert flags.run_names() == ["grpo/seed3", "fisft+/seed3"]
    assert flags.train["iterations"] == 7
    assert run_config(flags, flags.methods[1], 3).optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "name",
    ["compare-paper", "compare-length-ablation", "compare-strength", "compare-strength-small"],
)
def test_shipped_compare_presets_load(name: str) -> None:
    spec = load_spec(name)
    assert len(spec.seeds) >= 1 and len(spec.methods) >= 2


def test_strength_grid_is_bases_x_methods_x_seeds_on_equal_budgets() -> None:
    """Every run of the strength grid samples the same prompts x samples for the same number of
    iterations and takes the same (clipped) loss: only base and weights differ."""
    spec = load_spec("compare-strength")
    assert [b.label for b in spec.bases] == ["weak", "medium", "strong"]
    assert len(spec.run_names()) == 3 * 8 * 3 and spec.run_names()[0] == "grpo@weak/seed0"
    assert spec.passk is not None and (spec.passk.n, spec.passk.prompts) == (64, 100)
    configs = [run_config(spec, e, s, b, built=False) for e, b, s in spec.grid()]
    assert {(c.rollout.prompts_per_iter, c.rollout.samples_per_prompt) for c in configs} == {
        (16, 8)
    }
    assert {(c.iterations, c.eval.every) for c in configs} == {(100, 10)}
    assert {c.method.surrogate for c in configs} == {"clipped"}
    assert {c.method.beta for c in configs} == {0.0}


# ---------------------------------------------------------------- end to end


# Right when the completion contains an "e" (sampling stops there): signal for a random model.
letter_task("analysis-compare-e", "e", train=32, test=4, stop_at_letter=True)


def _tiny_spec(model_dir: Path) -> CompareSpec:
    return spec_from_dict(
        {
            "title": "test grid",
            "methods": ["grpo", "fisft+"],
            "seeds": [0, 1],
            "train": {
                "model": {"path": str(model_dir)},
                "task": {"name": "analysis-compare-e"},
                "rollout": {"prompts_per_iter": 2, "samples_per_prompt": 4, "max_new_tokens": 12},
                "optim": {"lr": 1e-2},
                "eval": {"every": 1, "num_examples": 4},
                "iterations": 2,
                "checkpoint_every": 1,
                "samples_every": 1,
                "tensorboard": False,
            },
        }
    )


def test_compare_grid_report_and_resume(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    from rlino.train import train

    calls: list[tuple[str, bool]] = []

    def counting_train(config, run_dir, **kw):
        calls.append((f"{run_dir.parent.name}/{run_dir.name}", kw["resume"]))
        return train(config, run_dir, **kw)

    spec = _tiny_spec(tiny_random_model_dir)
    out = tmp_path / "cmp"
    report = run_compare(spec, out, progress=False, train_fn=counting_train)
    assert report == out / "report.md"
    assert calls == [
        ("grpo/seed0", False),
        ("grpo/seed1", False),
        ("fisft+/seed0", False),
        ("fisft+/seed1", False),
    ]
    for name in ("report.md", "summary.json", "accuracy.png", "lengths.png", "reward.png"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["grpo"]["seeds"] == [0, 1]
    assert summary["methods"]["fisft+"]["final_accuracy"]["n"] == 2
    assert all(r["iterations"] == 2 and r["finished"] for r in summary["runs"])
    # same seed, same prompts: the first logged group's prompt agrees across methods
    first = [json.loads(line)["prompt"] for line in (out / "runs/grpo/seed1/samples.jsonl").open()]
    other = [
        json.loads(line)["prompt"] for line in (out / "runs/fisft+/seed1/samples.jsonl").open()
    ]
    first, other = first[:1], other[:1]
    assert first == other

    # a second call redoes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/metrics.jsonl")}
    assert len(mtimes) == 4
    calls.clear()
    run_compare(spec, out, progress=False, train_fn=counting_train)
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/metrics.jsonl")} == mtimes

    # interrupted runs: one with a checkpoint resumes, one without restarts cleanly
    shutil.rmtree(out / "runs/grpo/seed1/final")
    shutil.rmtree(out / "runs/fisft+/seed0/final")
    shutil.rmtree(out / "runs/fisft+/seed0/checkpoints")
    run_compare(spec, out, progress=False, train_fn=counting_train)
    assert calls == [("grpo/seed1", True), ("fisft+/seed0", False)]
    assert (out / "runs/grpo/seed1/final").is_dir() and (out / "runs/fisft+/seed0/final").is_dir()
    rows = [json.loads(line) for line in (out / "runs/fisft+/seed0/metrics.jsonl").open()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]

    # a changed shared config is refused instead of mixing runs
    spec.train["optim"] = {"lr": 5e-3}
    with pytest.raises(UserError, match="different config"):
        run_compare(spec, out, progress=False, train_fn=counting_train)


def test_cli_report_only_smoke(tmp_path: Path) -> None:
    for seed, end in enumerate([0.30, 0.50]):
        _write_run(tmp_path, f"grpo/seed{seed}", _rows(0.10, end, 40.0))
    done = subprocess.run(
        [sys.executable, "-m", "rlino", "compare", "--report-only", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "report:" in done.stdout
    assert "| grpo | 0,1 | 40.0 ± 14.1 [-87.1, 167.1]" in (tmp_path / "report.md").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "rlino", "compare", "--methods", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown method" in bad.stderr


@pytest.mark.slow
def test_cli_compare_smoke(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = [
        sys.executable, "-m", "rlino", "compare", "--methods", "grpo,fisft+", "--seeds", "0",
        "--iterations", "1", "--out", str(out), "--quiet",
        "--set", f"model.path={tiny_random_model_dir}",
        "--set", "rollout.prompts_per_iter=2", "--set", "rollout.samples_per_prompt=2",
        "--set", "rollout.max_new_tokens=8", "--set", "eval.num_examples=2",
        "--set", "tensorboard=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["grpo", "fisft+"]


def test_entries_on_a_preset_keep_its_method_settings() -> None:
    """A compare entry on a GPU preset keeps the preset's method settings that apply to it (GRPO's
    beta 0.001, token-mean, the clipped surrogate) and drops what its method cannot use, as
    `rlino train -c PRESET --method NAME` does."""
    spec = spec_from_dict(
        {
            "preset": "qwen2.5-0.5-gsm8k",
            "methods": [
                {"name": "grpo"},
                {"name": "fisft+-"},
                {"label": "g2", "name": "grpo", "beta": 0.002},
            ],
        }
    )
    grpo, fisft, g2 = (run_config(spec, entry, 0).method for entry in spec.methods)
    assert (grpo.beta, grpo.aggregation, grpo.surrogate) == (0.001, "token-mean", "clipped")
    assert (fisft.beta, fisft.aggregation, fisft.surrogate) == (0.0, "token-mean", "clipped")
    assert g2.beta == 0.002
