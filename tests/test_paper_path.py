"""The paper's path made exact: temperature, weighting input, group std, surrogate choice,
truncation, exact update statistics, and gradient equivalence measured along real training.

Each test pins a place where a reproduction could silently differ from the paper or from
TRL/verl; the loop-side ones run a real tiny model on the toy "contains-a" task of test_train.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from rlino.losses import policy_loss
from rlino.methods import MethodParams, ScoredBatch, resolve, weigh
from rlino.run_metrics import METRIC_KEYS
from rlino.setup import build, make_optimizer
from rlino.step import rollout, step
from rlino.train import train
from rlino.update import MicroBatching, TokenBatch, frozen_logprobs, update

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


def weights_of(name: str, rewards: list[list[float]], **params: object) -> torch.Tensor:
    r = torch.tensor(rewards)
    method, p = resolve(MethodParams(name=name, **params))  # type: ignore[arg-type]
    return weigh(method, p, ScoredBatch(r, r == 1.0))


# ---- closed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("group", range(2, 17))
def test_binary_grpo_weights_match_the_closed_form(group: int) -> None:
    """A+ = sqrt((1-p)/p), A- = -sqrt(p/(1-p)) for every p = k/G, by a separate formula."""
    rows = [[1.0] * k + [0.0] * (group - k) for k in range(1, group)]
    got = weights_of("grpo", rows)
    for k, row in enumerate(got, start=1):
        p = k / group
        plus, minus = math.sqrt((1 - p) / p), -math.sqrt(p / (1 - p))
        expected = torch.tensor([plus] * k + [minus] * (group - k))
        torch.testing.assert_close(row, expected, rtol=1e-6, atol=1e-6)
    # sample std (Bessel, TRL/verl): every weight shrinks by sqrt((G-1)/G)
    sample = weights_of("grpo", rows, std="sample")
    torch.testing.assert_close(sample, got * math.sqrt((group - 1) / group), rtol=1e-6, atol=1e-6)


def test_std_eps_is_added_to_the_std() -> None:
    got = weights_of("grpo", [[1.0, 0.0]], std_eps=0.5)  # std 0.5 -> 1.0
    torch.testing.assert_close(got, torch.tensor([[0.5, -0.5]]))


def test_weights_from_reward_or_from_correctness() -> None:
    """[0.1, 0, 0, 0, 0]: a wrong answer in the right format (Countdown's 0.1) is "above the
    mean" by reward, but the group has no correct sample, so by correctness it is filtered."""
    shaped = [[0.1, 0.0, 0.0, 0.0, 0.0]]
    by_reward = weights_of("grpo", shaped)
    assert by_reward[0, 0] > 0 and (by_reward[0, 1:] < 0).all()
    assert weights_of("fisft+", shaped)[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    for name in ("grpo", "fisft+", "fisft+-"):
        assert (weights_of(name, shaped, weight_on="correct") == 0).all(), name


def test_every_method_can_take_either_surrogate() -> None:
    """fisft through the clipped loss: ratio 1 gives the likelihood's gradient; off-policy the
    clip bounds it, the likelihood does not (the paper's authors ran F-ISFT clipped)."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    w = torch.tensor([0.5, -0.5], dtype=torch.float64)
    old = logp.detach() - 0.5  # ratio e^0.5 = 1.65: outside 1 +- 0.2
    grads = {}
    for surrogate in ("likelihood", "clipped"):
        method, params = resolve(MethodParams(name="fisft+-", surrogate=surrogate))
        for name, old_logp in (("on", None), ("off", old)):
            loss, stats = policy_loss(method, params, logp, mask, w, old_logp=old_logp)
            (grad,) = torch.autograd.grad(loss, logp)
            grads[surrogate, name] = grad
            assert ("clip_frac" in stats) == (surrogate == "clipped")
    torch.testing.assert_close(grads["clipped", "on"], grads["likelihood", "on"])
    assert not torch.allclose(grads["clipped", "off"], grads["likelihood", "off"])
    assert (grads["clipped", "off"][0] == 0).all()  # positive weight, ratio above 1 + eps: clipped


# ---- the loop on a real tiny model ----------------------------------------------------------


def test_update_logprobs_are_the_sampling_policys_at_temperature(
    tiny_random_model_dir: Path,
) -> None:
    """At T = 0.7 the log-probs the update differentiates are the sampler's (logits / T)."""
    setup = build(tiny_config(tiny_random_model_dir, rollout={"temperature": 0.7}))
    scored = rollout(setup, 0)
    r = scored.rollouts
    batch = TokenBatch.from_rollouts(r, setup.policy.device, 0.7)
    logp = frozen_logprobs(setup.policy.model, batch, MicroBatching(64))
    mask = r.completion_mask
    torch.testing.assert_close(logp[mask], r.logprobs[mask].float(), atol=1e-4, rtol=1e-4)
    at_one = frozen_logprobs(
        setup.policy.model, TokenBatch.from_rollouts(r, setup.policy.device), MicroBatching(64)
    )
    assert (at_one[mask] - r.logprobs[mask]).abs().max() > 1e-2  # T = 1 is another policy


def test_logged_update_losses_are_exact_minibatch_totals(tiny_random_model_dir: Path) -> None:
    """loss/policy is the loss over the whole minibatch, filtered rows included in the
    normaliser, whatever the micro-batch size."""
    cfg = tiny_config(tiny_random_model_dir, "grpo", optim={"minibatch_size": 16, "lr": 1e-9})
    setup = build(cfg)
    scored = rollout(setup, 0)
    w = weigh(setup.method, setup.params, scored)
    assert bool((w == 0).all(dim=1).any()) and bool((w != 0).any()), "need filtered and live groups"
    batch = TokenBatch.from_rollouts(scored.rollouts, setup.policy.device)
    with torch.no_grad():
        logp = frozen_logprobs(setup.policy.model, batch, MicroBatching(64))
        naive, _ = policy_loss(setup.method, setup.params, logp, batch.mask, w)
    start = {k: v.clone() for k, v in setup.policy.model.state_dict().items()}
    for micro in (1, 16):
        setup.policy.model.load_state_dict(start)
        optim = dataclasses.replace(cfg.optim, micro_batch_size=micro)
        s = dataclasses.replace(setup, config=dataclasses.replace(cfg, optim=optim))
        stats = update(s, batch, w, torch.optim.SGD(setup.policy.model.parameters(), lr=0.0))
        assert stats["loss/policy"] == pytest.approx(float(naive), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("rule", ["keep", "zero_reward", "mask"])
def test_on_truncation(tiny_random_model_dir: Path, rule: str) -> None:
    """A 3-token cap truncates most samples: keep scores them, zero_reward zeroes their reward,
    mask takes them out of the update (no gradient from them)."""
    cfg = tiny_config(
        tiny_random_model_dir,
        "raft",
        rollout={"max_new_tokens": 3, "on_truncation": rule},
        optim={"lr": 1e-2},
    )
    setup = build(cfg)
    before = [p.detach().clone() for p in setup.policy.model.parameters()]
    result = step(setup, 0, make_optimizer(setup))
    truncated = ~result.scored.rollouts.finished.view(result.scored.rewards.shape)
    assert bool(truncated.any())
    rewards = result.scored.rewards
    if rule == "zero_reward":
        assert bool((rewards[truncated] == 0).all()) and not bool(
            result.scored.correct[truncated].any()
        )
    if rule == "keep":
        assert bool((rewards[truncated] > 0).any())  # some cut samples still hold an "a"
    if rule == "mask":
        assert bool((result.weights[truncated] == 0).all())
        moved = any(
            not torch.equal(a, b)
            for a, b in zip(before, setup.policy.model.parameters(), strict=True)
        )
        assert moved == bool(((~truncated) & (result.weights != 0)).any())


def _equivalence_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["iteration"] > 0]


def test_equivalence_tracked_during_training(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    """GRPO (beta 0) with 2 minibatches: on-policy cosine 1 every iteration, an off-policy one
    logged; the likelihood surrogate gives cosine 1 everywhere (the loss *is* the likelihood)."""
    common = {"analysis": {"equivalence_every": 1}, "iterations": 3, "eval": {"every": 0}}
    train(tiny_config(tiny_random_model_dir, "grpo", **common), tmp_path / "g", progress=False)
    for row in _equivalence_rows(tmp_path / "g"):
        if row["equiv/cosine_onpolicy"] is not None:
            assert row["equiv/cosine_onpolicy"] >= 0.999
        assert "equiv/cosine_offpolicy" in row
    cfg = tiny_config(tiny_random_model_dir, "fisft+-", **common)
    train(cfg, tmp_path / "f", progress=False)
    for row in _equivalence_rows(tmp_path / "f"):
        for key in ("equiv/cosine_onpolicy", "equiv/cosine_offpolicy"):
            assert row[key] is None or row[key] >= 0.9999, (key, row[key])


def test_equivalence_measure_can_fail(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    """Negative control: off-policy minibatches after large steps, clipping active: the update
    taken is far from weighted SFT, and the measure says so."""
    cfg = tiny_config(
        tiny_random_model_dir,
        "grpo",
        analysis={"equivalence_every": 1},
        optim={"lr": 0.5, "minibatch_size": 4, "micro_batch_size": 4, "grad_clip": 0.0},
        method={"mu": 2},
        iterations=2,
        eval={"every": 0},
    )
    train(cfg, tmp_path / "run", progress=False)
    rows = _equivalence_rows(tmp_path / "run")
    off = [r["equiv/cosine_offpolicy"] for r in rows if r.get("equiv/cosine_offpolicy") is not None]
    assert off and min(off) < 0.9, off
    assert max(r["equiv/clip_frac"] or 0.0 for r in rows) > 0.05


def test_every_logged_key_is_documented(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    """metrics.jsonl keys all sit in run_metrics.METRIC_KEYS, and the README lists every one."""
    cfg = tiny_config(
        tiny_random_model_dir, "grpo", analysis={"equivalence_every": 1}, model={"dtype": "fp16"},
        iterations=2,
    )  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {key for row in rows for key in row}
    assert logged <= set(METRIC_KEYS), logged - set(METRIC_KEYS)
    readme = README.read_text()
    missing = [key for key in METRIC_KEYS if f"`{key}`" not in readme]
    assert not missing, missing


def test_onpolicy_cosine_is_none_when_the_first_minibatch_is_filtered(
    tiny_random_model_dir: Path,
) -> None:
    """The first optimiser step is the only on-policy one; if its minibatch carries no weight,
    no on-policy cosine is logged (a later, off-policy step must not stand in for it)."""
    setup = build(
        tiny_config(
            tiny_random_model_dir,
            "grpo",
            optim={"minibatch_size": 8, "lr": 1e-2},
            analysis={"equivalence_every": 1},
        )
    )
    scored = rollout(setup, 0)
    w = weigh(setup.method, setup.params, scored).clone()
    w[:2] = 0.0  # the first minibatch (8 samples = 2 groups of 4) filtered
    assert bool((w[2:] != 0).any())
    batch = TokenBatch.from_rollouts(scored.rollouts, setup.policy.device)
    stats = update(setup, batch, w, make_optimizer(setup), track_equivalence=True)
    assert stats["equiv/cosine_onpolicy"] is None
    assert stats["equiv/cosine_offpolicy"] is not None
