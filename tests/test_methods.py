"""Methods as weightings: hand-computed weights for every method, presets, validation."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rlino.errors import UserError
from rlino.methods import (
    METHODS,
    Method,
    MethodParams,
    ScoredBatch,
    filtered_groups,
    get_method,
    method_names,
    register_method,
    resolve,
    weigh,
)

# Two groups of G = 4: half right, and all right (nothing to compare: filtered).
HALF_AND_ALL = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
# One right of four (p = 1/4), and Countdown-style shaped rewards (1 right, 0.1 wrong, 0 none).
QUARTER_AND_SHAPED = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.0, 0.1]])
QUARTER_AND_SHAPED_CORRECT = QUARTER_AND_SHAPED == 1.0


def advantages(name: str, rewards: torch.Tensor, **params: object) -> torch.Tensor:
    """The (P, G) weights of method `name` when exactly the reward-1 samples are correct."""
    method, p = resolve(MethodParams(name=name, **params))  # type: ignore[arg-type]
    return weigh(method, p, ScoredBatch(rewards, rewards == 1.0))


def padded(completions: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of right-padded token-id rows, as rollouts give them."""
    width = max(len(c) for c in completions)
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    mask = torch.zeros(len(completions), width, dtype=torch.bool)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = True
    return ids, mask


def test_grpo_half_right_and_all_right_group() -> None:
    # p = 1/2: mean 1/2, population std 1/2, so A = +-1; the all-right group has std 0 -> 0.
    adv = advantages("grpo", HALF_AND_ALL)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_grpo_binary_closed_form_quarter_right() -> None:
    # p = 1/4: A+ = sqrt((1-p)/p) = sqrt(3) = 1.7320508, A- = -sqrt(p/(1-p)) = -0.5773503.
    adv = advantages("grpo", QUARTER_AND_SHAPED[:1])
    a_plus, a_minus = 1.7320508075688772, -0.5773502691896257
    torch.testing.assert_close(adv, torch.tensor([[a_plus, a_minus, a_minus, a_minus]]))
    for p in (1 / 5, 2 / 5, 3 / 5, 4 / 5):  # G = 5, as in the paper
        rewards = torch.tensor([[1.0] * round(5 * p) + [0.0] * round(5 * (1 - p))])
        adv = advantages("grpo", rewards)
        assert adv[0, 0].item() == pytest.approx(math.sqrt((1 - p) / p), rel=1e-6)
        assert adv[0, -1].item() == pytest.approx(-math.sqrt(p / (1 - p)), rel=1e-6)


def test_grpo_shaped_countdown_rewards() -> None:
    # mean 0.3; deviations 0.7, -0.2, -0.3, -0.2; variance 0.66 / 4 = 0.165; std 0.4062019.
    adv = advantages("grpo", QUARTER_AND_SHAPED[1:])
    expected = torch.tensor([[1.7232808737, -0.4923659639, -0.7385489459, -0.4923659639]])
    torch.testing.assert_close(adv, expected)


def test_grpo_without_std_scaling_is_reward_minus_mean() -> None:
    adv = advantages("grpo", QUARTER_AND_SHAPED, scale_std=False)
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.7, -0.2, -0.3, -0.2]])
    torch.testing.assert_close(adv, expected)
    assert advantages("dr-grpo", QUARTER_AND_SHAPED).equal(adv)


def test_constant_groups_are_filtered_even_with_float_noise() -> None:
    # 0.1 is not exact in binary; the spread of this group is rounding noise, not signal.
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
    for name in ("grpo", "fisft-grpo", "fisft+-", "fisft+", "fisft-"):
        assert advantages(name, rewards).eq(0).all(), name
    assert advantages("grpo", rewards, scale_std=False).eq(0).all()


def test_fisft_grpo_uses_grpo_weights() -> None:
    assert advantages("fisft-grpo", QUARTER_AND_SHAPED).equal(
        advantages("grpo", QUARTER_AND_SHAPED)
    )


@pytest.mark.parametrize(
    ("name", "above", "below"),
    [("fisft+", 1.0, 0.0), ("fisft-", 0.0, -1.0), ("fisft+-", 0.5, -0.5), ("fisft", 0.5, -0.5)],
)
def test_fisft_presets(name: str, above: float, below: float) -> None:
    adv = advantages(name, HALF_AND_ALL)
    torch.testing.assert_close(
        adv, torch.tensor([[above, below, below, above], [0.0, 0.0, 0.0, 0.0]])
    )
    # shaped: only the 1.0 is above the mean 0.3; 0.1 is below it.
    adv = advantages(name, QUARTER_AND_SHAPED[1:])
    torch.testing.assert_close(adv, torch.tensor([[above, below, below, below]]))


def test_fisft_alpha_and_samples_at_the_mean() -> None:
    # mean 0.5: the two 0.5 rewards sit exactly at it and get weight 0.
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5]])
    adv = advantages("fisft", rewards, alpha=0.25)
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.25, 0.0, 0.0]]))


def test_raft_weights_correct_samples_only() -> None:
    batch = ScoredBatch(QUARTER_AND_SHAPED, QUARTER_AND_SHAPED_CORRECT)
    adv = weigh(*resolve(MethodParams(name="raft")), batch)
    # the shaped 0.1 rewards are not correct: raft ignores reward shaping.
    torch.testing.assert_close(adv, torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    everything = torch.ones(2, 4)
    adv = weigh(*resolve(MethodParams(name="raft")), ScoredBatch(everything, everything.bool()))
    assert adv.equal(everything)  # not group-relative: an all-right group still trains


def test_raft_dedup_counts_identical_correct_completions_once() -> None:
    rewards = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 0.0]])
    completions = [
        (5, 6), (5, 6), (9,), (7,), (9,),  # group 0: (5, 6) twice and right; (9,) twice, wrong
        (5, 6), (1,), (5, 6, 2), (1,), (3,),  # group 1: (5, 6) again, but in another group
    ]  # fmt: skip
    method, p = resolve(MethodParams(name="raft", dedup=True))
    ids, mask = padded(completions)
    adv = weigh(method, p, ScoredBatch(rewards, rewards == 1.0, ids, mask))
    expected = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    with pytest.raises(ValueError, match="token ids"):
        weigh(method, p, ScoredBatch(rewards, rewards == 1.0))


def test_group_weight_sums_show_fisft_imbalance() -> None:
    # 1 right of 8: F-ISFT+- gives +0.5 once and -0.5 seven times, net -3; GRPO's standardised
    # weights sum to 0 in every group. The all-right group is filtered: weight 0 under both.
    rewards = torch.tensor([[1.0] + [0.0] * 7, [1.0] * 8])
    fisft = advantages("fisft+-", rewards)
    grpo = advantages("grpo", rewards)
    torch.testing.assert_close(fisft.sum(dim=1), torch.tensor([-3.0, 0.0]))
    torch.testing.assert_close(grpo.sum(dim=1), torch.tensor([0.0, 0.0]))
    assert filtered_groups(rewards).tolist() == [False, True]
    assert (fisft[1] == 0).all() and (grpo[1] == 0).all()


def test_filtered_groups_tolerate_float_noise() -> None:
    rewards = torch.tensor([[0.1, 0.1 + 1e-9, 0.1], [0.1, 0.2, 0.1], [0.0, 0.0, 0.0]])
    assert filtered_groups(rewards).tolist() == [True, False, True]


def test_weigh_checks_shapes() -> None:
    method, p = resolve(MethodParams())
    with pytest.raises(ValueError, match=r"\(P, G\)"):
        weigh(method, p, ScoredBatch(torch.zeros(8), torch.zeros(8, dtype=torch.bool)))


def test_weigh_checks_what_a_method_returns() -> None:
    def wrong_shape(batch, params, sampler):
        return batch.rewards.reshape(-1)  # (N,) instead of (P, G)

    def per_token(batch, params, sampler):
        return batch.completion_mask.float()  # weight 1 on every real token

    bad = Method(
        "bad", "x", wrong_shape, surrogate="likelihood", uses_kl=False, group_relative=False
    )
    tokens = Method(
        "tok", "x", per_token, surrogate="likelihood", uses_kl=False, group_relative=False,
        per_token=True,
    )  # fmt: skip
    ids, mask = padded([(1, 2), (3,), (4, 5, 6), (7,)])
    batch = ScoredBatch(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), ids, mask)
    with pytest.raises(ValueError, match=r"must return \(P, G\)"):
        weigh(bad, MethodParams(), batch)
    assert weigh(tokens, MethodParams(), batch).equal(mask.float())  # (N, T)
    with pytest.raises(ValueError, match="needs the completions' ids"):
        weigh(tokens, MethodParams(), ScoredBatch(batch.rewards, batch.correct))
    with pytest.raises(ValueError, match=r"must return \(N, T\) = \(4, 2\)"):
        weigh(tokens, MethodParams(), ScoredBatch(batch.rewards, batch.correct, ids[:, :2], mask))


def test_resolve_expands_presets() -> None:
    method, p = resolve(MethodParams(name="fisft+"))
    assert (method.name, p.name, p.alpha) == ("fisft", "fisft", 0.0)
    method, p = resolve(MethodParams(name="dr-grpo"))
    assert (method.name, p.scale_std, p.aggregation) == ("grpo", False, "constant")
    assert get_method("fisft-").name == "fisft"
    assert resolve(MethodParams(name="grpo", beta=0.001))[1].beta == 0.001


def test_method_shapes_of_loss() -> None:
    assert get_method("grpo").surrogate == "clipped" and get_method("grpo").uses_kl
    for name in ("fisft", "fisft-grpo", "raft"):
        m = get_method(name)
        assert m.surrogate == "likelihood" and not m.uses_kl, name
    assert not get_method("raft").group_relative


def test_register_a_new_method_in_a_few_lines() -> None:
    def best_of_group(batch, params, sampler):
        r = batch.rewards  # (P, G)
        top = (r == r.max(dim=1, keepdim=True).values).float()  # (P, G)
        return top / top.sum(dim=1, keepdim=True)

    m = Method(
        "best-of-group-test",
        "SFT on each group's best sample",
        best_of_group,
        surrogate="likelihood",
        uses_kl=False,
        group_relative=False,
    )
    try:
        register_method(m)
        MethodParams(name="best-of-group-test").validate(group_size=4)
        adv = advantages("best-of-group-test", QUARTER_AND_SHAPED)
        torch.testing.assert_close(adv, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        with pytest.raises(ValueError, match="already registered"):
            register_method(m)
    finally:
        METHODS.pop("best-of-group-test", None)
    with pytest.raises(ValueError, match="surrogate"):
        Method("x", "x", best_of_group, surrogate="ppo", uses_kl=False, group_relative=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", method_names())
def test_defaults_validate_for_every_name(name: str) -> None:
    MethodParams(name=name).validate(group_size=5)


@pytest.mark.parametrize(
    ("params", "group_size", "message"),
    [
        (MethodParams(name="ppo"), 4, "unknown method 'ppo'; known: dr-grpo, fisft,"),
        (MethodParams(aggregation="sum"), 4, "unknown aggregation 'sum'; known: seq-mean"),
        (MethodParams(name="grpo"), 1, "needs at least 2 samples per prompt (got 1)"),
        (MethodParams(name="fisft+"), 1, "needs at least 2 samples per prompt (got 1)"),
        (MethodParams(name="raft"), 0, "at least 1 (got 0)"),
        (MethodParams(name="fisft", alpha=1.5), 4, "alpha must be in [0, 1] (got 1.5)"),
        (MethodParams(clip_eps=0.0), 4, "clip_eps must be > 0"),
        (MethodParams(beta=-0.1), 4, "beta must be >= 0"),
        (MethodParams(name="fisft+-", beta=0.001), 4, "'fisft+-' has no reference model"),
        (MethodParams(name="raft", beta=0.001), 4, "has no reference model"),
        (MethodParams(mu=0), 4, "mu (passes per rollout batch) must be >= 1"),
        (MethodParams(aggregation="constant", constant_length=0), 4, "constant_length"),
        (MethodParams(name="grpo", dedup=True), 4, "dedup applies to raft only"),
        (MethodParams(name="fisft+", alpha=0.3), 4, "'fisft+' fixes alpha=0.0"),
        (MethodParams(name="grpo-nokl", beta=0.001), 4, "use method 'grpo' to set beta"),
    ],
)
def test_validate_rejects_impossible_params(
    params: MethodParams, group_size: int, message: str
) -> None:
    with pytest.raises(UserError) as info:
        params.validate(group_size=group_size)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_validate_accepts_sensible_combinations() -> None:
    MethodParams(name="raft", dedup=True).validate(group_size=1)
    MethodParams(name="grpo", beta=0.001, mu=2, aggregation="token-mean").validate(group_size=5)
    MethodParams(name="fisft+", alpha=0.0).validate(group_size=2)  # agrees with the preset
    MethodParams(name="fisft-grpo", mu=3, scale_std=False).validate(group_size=8)


def test_importing_methods_does_not_import_torch() -> None:
    # The config (and so the CLI) imports this module at start-up.
    code = "import sys, rlino.methods; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
