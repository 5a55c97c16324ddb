"""Length analysis: the per-token weight formulas against autograd, and the run analysis on files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlino.analysis.lengths import (
    analyze_lengths,
    checkpoints,
    default_out,
    expand_run_dirs,
    grpo_wrong_advantage,
    length_table,
    sample_lengths,
    token_weights,
    weight_vs_length,
)
from rlino.errors import UserError
from rlino.losses import weighted_likelihood_loss


@pytest.mark.parametrize("mode", ["seq-mean", "token-mean", "constant"])
def test_token_weights_are_the_loss_gradient(mode: str) -> None:
    weights = [1.2, -0.4, 0.0, -0.8]
    lengths = [3, 7, 2, 5]
    width = max(lengths)
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    logp = torch.randn(len(lengths), width, dtype=torch.float64, requires_grad=True)
    loss = weighted_likelihood_loss(
        logp, torch.tensor(weights, dtype=torch.float64), mask, mode, constant_length=10
    )
    loss.backward()
    expected = token_weights(weights, lengths, mode, constant_length=10)
    for i, n in enumerate(lengths):
        # every real token of sample i gets -d loss / d logp = the sample's per-token weight
        assert torch.allclose(-logp.grad[i, :n], torch.full((n,), expected[i], dtype=torch.float64))
        assert torch.all(logp.grad[i, n:] == 0)


def test_seq_mean_dilutes_long_wrong_answers() -> None:
    a = grpo_wrong_advantage(0.25)
    assert a == pytest.approx(-1 / math.sqrt(3))
    seq = weight_vs_length(a, [10, 20, 40], "seq-mean", mean_length=20, constant_length=64)
    tok = weight_vs_length(a, [10, 20, 40], "token-mean", mean_length=20, constant_length=64)
    const = weight_vs_length(a, [10, 20, 40], "constant", mean_length=20, constant_length=64)
    assert [abs(w) for w in seq] == pytest.approx([abs(a) / 10, abs(a) / 20, abs(a) / 40])
    assert tok == pytest.approx([a / 20] * 3)
    assert const == pytest.approx([a / 64] * 3)
    with pytest.raises(ValueError):
        token_weights([1.0], [1], "nonsense")


def test_checkpoints_spread_over_the_run() -> None:
    assert checkpoints(range(1, 4)) == [1, 2, 3]
    assert checkpoints(range(1, 101), 5) == [1, 26, 51, 75, 100]


def _fake_run(root: Path, name: str, wrong_growth: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rows = [
        {
            "iteration": 0,
            "eval/accuracy": 0.1,
            "eval/length_correct": 30.0,
            "eval/length_wrong": 40.0,
        }
    ]
    for it in range(1, 11):
        rows.append(
            {
                "iteration": it,
                "train/length_mean": 35.0,
                "train/length_correct": 30.0,
                "train/length_wrong": 40.0 + wrong_growth * it,
                "train/accuracy": 0.2,
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [
        {"iteration": it, "length": n, "correct": c, "reward": float(c)}
        for it in (5, 10)
        for n, c in ((20, True), (50 + it, False), (45, False))
    ]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run / "config.yaml").write_text(
        "method:\n  aggregation: seq-mean\nrollout:\n  max_new_tokens: 96\n"
    )
    return run


def test_analyze_lengths_on_runs(tmp_path: Path) -> None:
    a = _fake_run(tmp_path, "grpo-s0", 2.0)
    b = _fake_run(tmp_path, "fisft+-s0", 0.0)
    out = analyze_lengths([a, b], tmp_path / "out")
    for name in ("lengths_over_time.png", "length_distribution.png", "weight_vs_length.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    grpo = out["runs"]["grpo-s0"]
    assert grpo["table"][0]["length_wrong"] == 42.0
    assert grpo["table"][-1]["length_wrong"] == 60.0
    assert grpo["samples"]["end"]["wrong"] == [60, 45]
    mech = out["mechanism"]
    assert mech["constant_length"] == 96
    assert mech["per_token_weight_at"]["seq-mean"]["1"] == pytest.approx(mech["advantage_wrong"])


def test_small_helpers() -> None:
    rows = [{"iteration": 0}, {"iteration": 1, "train/length_wrong": 5.0}]
    assert length_table(rows)[0]["length_wrong"] == 5.0
    assert sample_lengths([]) == {}


def test_cli_lengths_smoke(tmp_path: Path) -> None:
    import subprocess
    import sys

    _fake_run(tmp_path / "cmp" / "runs", "grpo/seed0", 1.0)
    _fake_run(tmp_path / "cmp" / "runs", "fisft+-/seed0", 0.0)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlino",
            "analyze",
            "lengths",
            str(tmp_path / "cmp"),
            "--out",
            str(tmp_path / "plots"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["runs"]) == {"grpo/seed0", "fisft+-/seed0"}
    assert (tmp_path / "plots" / "weight_vs_length.png").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "rlino", "analyze", "lengths", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_run_arguments_compare_dir_label_dir_and_run(tmp_path: Path) -> None:
    cmp = tmp_path / "cmp"
    runs = cmp / "runs"
    grpo = [_fake_run(runs, f"grpo/seed{seed}", 1.0) for seed in (0, 1, 10)]
    fisft = _fake_run(runs, "fisft+-/seed0", 0.0)
    alone = _fake_run(tmp_path / "single", "my-run", 0.0)
    assert expand_run_dirs([cmp]) == [fisft, *grpo]  # no compare.json: by label, then seed
    # `rlino analyze lengths cmp/runs/*`: each runs/LABEL stands for its seedN runs, by seed
    assert expand_run_dirs(sorted(runs.iterdir())) == [fisft, *grpo]
    assert expand_run_dirs([grpo[1], runs / "grpo", alone]) == [grpo[1], grpo[0], grpo[2], alone]
    assert default_out(cmp, grpo[0]) == cmp / "lengths"
    assert default_out(runs / "grpo", grpo[0]) == cmp / "lengths"
    assert default_out(grpo[0], grpo[0]) == cmp / "lengths"
    assert default_out(alone, alone) == tmp_path / "single" / "lengths"
    names = set(analyze_lengths(expand_run_dirs([runs / "grpo", alone]), tmp_path / "o")["runs"])
    assert names == {"grpo/seed0", "grpo/seed1", "grpo/seed10", "my-run"}
    with pytest.raises(UserError, match="neither"):
        expand_run_dirs([tmp_path])


def test_old_flat_compare_layout_is_refused(tmp_path: Path) -> None:
    _fake_run(tmp_path / "cmp" / "runs", "grpo-s0", 1.0)
    with pytest.raises(UserError, match="old layout"):
        expand_run_dirs([tmp_path / "cmp"])
