"""benchmarks/bench_method_cost.py: a real tiny run of both arms, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_modules import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script as a module."""
    return load_benchmark("bench_method_cost")


@pytest.mark.slow
def test_tiny_run_times_both_arms_and_only_grpo_loads_a_reference(
    bench: ModuleType, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # 2 x 2 samples in minibatches of 2: two optimiser steps, so grpo's clipped ratio needs the
    # old log-probs as well as the reference's
    argv = ["--prompts", "2", "--samples", "2", "--new-tokens", "8", "--minibatch", "2"]
    result = bench.main([*argv, "--iters", "1", "--warmup", "0"])
    assert json.loads(capsys.readouterr().out) == result
    arms = result["arms"]
    assert set(arms) == {"grpo+kl", "fisft+-"}
    for arm in arms.values():
        assert arm["median_iter_s"] > 0 and arm["median_rollout_s"] > 0
        assert arm["median_update_s"] > 0
        assert arm["median_iter_s"] >= arm["median_rollout_s"] + arm["median_update_s"]
        assert 4 <= arm["median_sampled_tokens"] <= 4 * 8
        assert len(arm["iter_s"]) == 1
    grpo, fisft = arms["grpo+kl"], arms["fisft+-"]
    assert grpo["reference_model"] and grpo["beta"] == 0.04 and grpo["surrogate"] == "clipped"
    assert grpo["median_ref_passes"] == 1 and grpo["median_old_passes"] == 1
    assert grpo["median_frozen_s"] > 0
    assert not fisft["reference_model"] and fisft["surrogate"] == "likelihood"
    assert fisft["median_ref_passes"] == fisft["median_old_passes"] == 0
    assert fisft["median_frozen_s"] == 0 and fisft["kl"] == [0.0]
    ratios = result["ratios"]
    assert ratios["iter_s"] == pytest.approx(fisft["median_iter_s"] / grpo["median_iter_s"])
    assert ratios["update_s"] == pytest.approx(fisft["median_update_s"] / grpo["median_update_s"])
    assert result["grpo_sampling_fraction"] == pytest.approx(
        grpo["median_rollout_s"] / grpo["median_iter_s"]
    )
    assert result["goal_met"]["update_s"] == (ratios["update_s"] <= 0.6)
    machine = result["machine"]
    assert len(machine["loadavg_start"]) == len(machine["loadavg_end"]) == 3
    assert machine["threads"] == 1 and machine["dtype"] == "fp32"


def test_bad_model_or_task_exits_with_one_line(bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as missing:
        bench.main(["--model", str(tmp_path / "nowhere")])
    assert "is not a directory" in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(SystemExit) as no_model:
        bench.main(["--task", "gsm8k"])  # only countdown has a built-in base
    assert "needs a model" in str(no_model.value) and "\n" not in str(no_model.value)
