"""One training step on a real tiny model: what it logs, per-token weights, the sampling handle.

The loop, the step benchmark and the equivalence analysis all go through `rlino.step.step` and
`rlino.methods.weigh`; these tests pin down what a method gets from them: the scored batch, and a
sampler that draws verified continuations of partial completions (Monte-Carlo values).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from rlino.methods import METHODS, Method, register_method
from rlino.setup import build, make_optimizer
from rlino.step import ContinuationSampler, rollout, step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_logs_the_loop_row_and_trains(tiny_random_model_dir: Path) -> None:
    setup = build(tiny_config(tiny_random_model_dir, "grpo"))
    optimizer = make_optimizer(setup)
    before = [p.detach().clone() for p in setup.policy.model.parameters()]
    result = step(setup, 0, optimizer)
    p, g = setup.config.rollout.prompts_per_iter, setup.config.rollout.samples_per_prompt
    assert result.weights.shape == (p, g) and result.scored.rewards.shape == (p, g)
    row = result.metrics
    for key in ("train/reward_mean", "train/weight_sum_mean", "loss/total", "time/rollout_s"):
        assert key in row, key
    assert row["optim/lr"] == setup.config.optim.lr
    assert row["train/sampled_tokens"] == int(result.scored.lengths.sum())
    assert "train/mc_tokens" not in row  # grpo draws no extra samples
    after = list(setup.policy.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_continuations_of_a_decided_prefix_are_scored_right(tiny_random_model_dir: Path) -> None:
    """contains-a: once a prefix holds an "a", every continuation of it is right (reward 1); the
    empty prefix gives the policy's own success rate. Deterministic for the seed."""
    setup = build(tiny_config(tiny_random_model_dir, "grpo"))
    scored = rollout(setup, 0)
    tokenizer = setup.policy.tokenizer
    rows, prefixes = [], []
    for k in range(scored.rewards.numel()):
        ids = list(scored.completion(k))
        for cut in range(1, len(ids) + 1):
            if "a" in tokenizer.decode(ids[:cut], skip_special_tokens=True):
                rows.append(k)
                prefixes.append(ids[:cut])
                break
    assert rows, "no sample with an 'a' to continue from"
    sampler = ContinuationSampler(setup, scored, seed=5)
    rewards = sampler.continuation_rewards(rows, prefixes, k=3)
    assert rewards.shape == (len(rows), 3)
    assert bool((rewards == 1.0).all())
    assert sampler.calls == 1 and sampler.sampled_tokens > 0
    empty = ContinuationSampler(setup, scored, seed=5).continuation_rewards([0, 1], [[], []], k=4)
    again = ContinuationSampler(setup, scored, seed=5).continuation_rewards([0, 1], [[], []], k=4)
    assert torch.equal(empty, again)


def first_token_credit(batch, params, sampler):  # a per-token method that samples (as vine will)
    """Weight 1 on the first token of samples whose first-token prefix is likely to succeed."""
    n, width = batch.completion_ids.shape
    rows = list(range(n))
    values = sampler.continuation_rewards(rows, [batch.completion(k)[:1] for k in rows], k=2)
    weights = torch.zeros(n, width)
    weights[:, 0] = values.mean(dim=1) - 0.5
    return weights


def test_a_per_token_method_with_a_sampler_runs_in_the_one_loop(
    tiny_random_model_dir: Path,
) -> None:
    method = Method(
        "first-token-credit-test",
        "test: Monte-Carlo credit on the first token",
        first_token_credit,
        surrogate="clipped",
        uses_kl=False,
        group_relative=False,
        per_token=True,
    )
    register_method(method)
    try:
        setup = build(tiny_config(tiny_random_model_dir, "first-token-credit-test"))
        result = step(setup, 0, make_optimizer(setup))
    finally:
        METHODS.pop("first-token-credit-test")
    n = result.scored.rewards.numel()
    assert result.weights.shape == result.scored.completion_ids.shape
    assert bool((result.weights[:, 1:] == 0).all()) and bool((result.weights[:, 0] != 0).any())
    assert result.metrics["train/mc_tokens"] >= n * 2  # at least one token per continuation
    assert result.metrics["optim/grad_norm"] > 0
