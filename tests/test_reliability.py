"""Reliability under faults: each test injects one (non-finite steps, ...) into a real tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config

from rlino.errors import UserError
from rlino.methods import METHODS, Method, register_method
from rlino.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _nan_after(calls: int):
    """A weighting that is GRPO-like for `calls` calls, then NaN for every sample."""
    seen = {"n": 0}

    def weighting(batch, params, sampler):
        seen["n"] += 1
        w = batch.rewards - batch.rewards.mean(dim=1, keepdim=True)
        return w * float("nan") if seen["n"] > calls else w

    return weighting


@pytest.fixture
def nan_method():
    def register(calls: int) -> str:
        name = f"nan-after-{calls}-test"
        register_method(
            Method(name, "test: NaN weights", _nan_after(calls), "likelihood", False, True)
        )
        return name

    yield register
    for key in [k for k in METHODS if k.startswith("nan-after-")]:
        METHODS.pop(key)


def test_nonfinite_steps_are_skipped_then_the_run_stops(
    tiny_random_model_dir: Path, tmp_path: Path, nan_method
) -> None:
    """Iteration 1 trains; 2 and 3 get NaN weights: skipped (weights and AdamW state untouched,
    logged); with max_nonfinite_steps 2 the run stops at the second one, one-line error, and the
    checkpoint of iteration 2 holds iteration 1's weights."""
    name = nan_method(1)
    cfg = tiny_config(
        tiny_random_model_dir,
        name,
        optim={"minibatch_size": 16, "max_nonfinite_steps": 2},
        checkpoint_every=1,
        eval={"every": 0},
    )
    run = tmp_path / "run"
    with pytest.raises(UserError, match="2 optimiser steps in a row had a non-finite"):
        train(cfg, run, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["optim/nonfinite_steps"] for r in rows[1:]] == [0, 1]
    first = load_file(str(run / "checkpoints" / "iter_000001" / "model" / "model.safetensors"))
    second = load_file(str(run / "checkpoints" / "iter_000002" / "model" / "model.safetensors"))
    start = load_file(str(tiny_random_model_dir / "model.safetensors"))
    assert any(not torch.equal(first[k], start[k]) for k in first)  # iteration 1 trained
    assert all(torch.equal(first[k], second[k]) for k in first)  # the NaN step changed nothing
    assert all(bool(torch.isfinite(v).all()) for v in second.values())
    opt1 = torch.load(run / "checkpoints" / "iter_000001" / "optimizer.pt", weights_only=True)
    opt2 = torch.load(run / "checkpoints" / "iter_000002" / "optimizer.pt", weights_only=True)
    for key, state in opt1["state"].items():
        assert torch.equal(state["exp_avg"], opt2["state"][key]["exp_avg"])
        assert torch.equal(state["step"], opt2["state"][key]["step"])
    assert not (run / "final").exists()


def test_fp16_update_with_every_group_filtered(tiny_random_model_dir: Path) -> None:
    """fp16 loss scaling, first update, every weight 0 (all groups filtered): no row runs, so the
    scaler has nothing to unscale; the step is a no-op instead of an AssertionError."""
    from rlino.setup import build, make_optimizer
    from rlino.step import rollout
    from rlino.update import TokenBatch, update

    setup = build(tiny_config(tiny_random_model_dir, "grpo", model={"dtype": "fp16"}))
    scored = rollout(setup, 0)
    batch = TokenBatch.from_rollouts(scored.rollouts, setup.policy.device)
    before = [p.detach().clone() for p in setup.policy.model.parameters()]
    stats = update(setup, batch, torch.zeros_like(scored.rewards), make_optimizer(setup))
    assert stats["optim/steps"] >= 1 and stats["optim/nonfinite_steps"] == 0
    after = list(setup.policy.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
