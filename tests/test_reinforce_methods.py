"""NSR, PSR and W-REINFORCE (Zhu et al. 2025): hand-computed weights, validation, the NSR gradient
on a real tiny model, and the clipped-surrogate F-ISFT spelling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from rlino.errors import UserError
from rlino.method_switch import applicable_params, carry_params
from rlino.methods import MethodParams, ScoredBatch, get_method, resolve, weigh

pytestmark = pytest.mark.usefixtures("one_thread")

# P = 3 groups of G = 4: one right with Countdown-shaped wrong rewards (0.1 = well-formed but
# wrong), all wrong, all right. Correct means reward 1.
REWARDS = torch.tensor([[1.0, 0.1, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
CORRECT = REWARDS == 1.0


def weights_of(name: str, rewards: torch.Tensor = REWARDS, **params: object) -> torch.Tensor:
    method, p = resolve(MethodParams(name=name, **params))  # type: ignore[arg-type]
    return weigh(method, p, ScoredBatch(rewards, rewards == 1.0))


@pytest.mark.parametrize(
    ("name", "params", "right", "wrong"),
    [
        ("nsr", {}, 0.0, -1.0),
        ("psr", {}, 1.0, 0.0),
        ("w-reinforce", {}, 0.1, -1.0),  # the paper's lambda = 0.1
        ("w-reinforce", {"positive_weight": 0.5}, 0.5, -1.0),
        ("w-reinforce", {"positive_weight": 0.0}, 0.0, -1.0),  # = nsr
    ],
)
def test_weights_by_hand(name: str, params: dict, right: float, wrong: float) -> None:
    r, w = right, wrong
    expected = torch.tensor([[r, w, w, w], [w, w, w, w], [r, r, r, r]])
    torch.testing.assert_close(weights_of(name, **params), expected)
    # the weights read binary success only: comparing rewards or correctness changes nothing
    torch.testing.assert_close(weights_of(name, weight_on="correct", **params), expected)


def test_no_group_filtering_and_one_sample_groups() -> None:
    """All-wrong and all-right groups keep their weights (GRPO and F-ISFT give them 0); G = 1 works."""
    nsr = weights_of("nsr")
    assert (nsr[1] == -1).all() and (weights_of("fisft-")[1] == 0).all()
    assert (weights_of("psr")[2] == 1).all() and (weights_of("grpo")[2] == 0).all()
    single = torch.tensor([[1.0], [0.0]])
    torch.testing.assert_close(weights_of("w-reinforce", single), torch.tensor([[0.1], [-1.0]]))
    for name in ("nsr", "psr", "w-reinforce"):
        MethodParams(name=name).validate(group_size=1)


def test_loss_shapes_and_knobs() -> None:
    for name in ("nsr", "psr", "w-reinforce"):
        method = get_method(name)
        assert method.surrogate == "clipped" and not method.uses_kl, name
        assert not method.group_relative and not method.per_token, name
    assert resolve(MethodParams(name="nsr"))[1].positive_weight == 0.0
    assert "positive_weight" in applicable_params("w-reinforce")
    assert "positive_weight" not in applicable_params("nsr")  # the preset fixes it
    assert "positive_weight" not in applicable_params("grpo")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (MethodParams(name="w-reinforce", positive_weight=-0.1), "positive_weight must be >= 0"),
        (MethodParams(name="nsr", positive_weight=0.3), "'nsr' fixes positive_weight=0.0"),
        (MethodParams(name="nsr", beta=0.01), "'nsr' has no reference model"),
        (MethodParams(name="psr", dedup=True), "dedup applies to raft only"),
    ],
)
def test_validation(params: MethodParams, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        params.validate(group_size=4)
    assert "\n" not in str(info.value)


def test_switching_a_preset_to_the_new_methods() -> None:
    """A GRPO preset's block carried to w-reinforce keeps the loss settings, drops beta; nsr also
    drops a positive_weight the preset set (it fixes lambda = 0)."""
    block = {"name": "grpo", "beta": 0.001, "clip_eps": 0.28, "surrogate": "clipped"}
    carried, notes = carry_params({**block, "positive_weight": 0.3}, "w-reinforce", who="test")
    assert carried == {
        "name": "w-reinforce",
        "clip_eps": 0.28,
        "surrogate": "clipped",
        "positive_weight": 0.3,
    }
    assert list(notes) == ["beta"]
    carried, notes = carry_params({**block, "positive_weight": 0.3}, "nsr", who="test")
    assert "positive_weight" not in carried and set(notes) == {"beta", "positive_weight"}
    assert "nsr fixes positive_weight=0.0" in notes["positive_weight"]


# ---- on a real tiny model --------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["seq-mean", "token-mean"])
def test_nsr_gradient_is_minus_the_likelihood_gradient_of_wrong_samples(
    tiny_random_model_dir: Path, aggregation: str
) -> None:
    """mu = 1, ratio 1: NSR's clipped loss has the gradient of +sum over wrong samples of their
    log-likelihood / normaliser, so descending it lowers exactly the wrong samples' likelihood."""
    from rlino.analysis.gradients import flat_gradient
    from rlino.setup import build
    from rlino.step import rollout
    from rlino.update import TokenBatch, batch_logprobs, flat_grad

    cfg = tiny_config(tiny_random_model_dir, "nsr", method={"aggregation": aggregation})
    setup = build(cfg)
    scored = rollout(setup, 0)
    wrong = ~scored.correct.reshape(-1)  # (N,)
    assert 0 < int(wrong.sum()) < wrong.numel(), "the toy task must give right and wrong samples"
    batch = TokenBatch.from_rollouts(scored.rollouts, setup.policy.device)
    model = setup.policy.model
    got, stats = flat_gradient(model, scored, batch, setup.params, micro=3)
    assert stats["clip_frac"] == 0.0  # on-policy: nothing clipped

    model.zero_grad(set_to_none=True)
    rows = torch.arange(len(batch))
    logp = batch_logprobs(model, batch, rows).float()  # (N, T)
    mask = batch.mask[:, : logp.shape[1]].float()  # (N, T)
    sums = (logp * mask).sum(dim=1)  # (N,) log-likelihood of each sample
    if aggregation == "seq-mean":  # each sample over its own length, then the mean over N
        wrong_loglik = (sums / mask.sum(dim=1))[wrong].sum() / len(batch)
    else:  # over all tokens of the batch
        wrong_loglik = sums[wrong].sum() / mask.sum()
    wrong_loglik.backward()
    expected = flat_grad(model)
    model.zero_grad(set_to_none=True)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["nsr", "psr", "w-reinforce"])
def test_one_training_step_changes_the_model(
    tiny_random_model_dir: Path, tmp_path: Path, name: str
) -> None:
    import json

    from safetensors.torch import load_file

    from rlino.train import train

    result = train(tiny_config(tiny_random_model_dir, name, iterations=1), tmp_path / "r")
    assert result.completed
    before = load_file(str(tiny_random_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "r" / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before), name
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[1])
    assert "optim/clip_frac" in row  # the clipped surrogate ran


def test_clipped_surrogate_fisft_is_one_setting(tiny_random_model_dir: Path) -> None:
    """The authors' F-ISFT (+-0.5 weights through GRPO's clipped ratio loss) is
    `method: {name: fisft+-, surrogate: clipped}`; the update then reports clip statistics."""
    from rlino.setup import build, make_optimizer
    from rlino.step import step

    cfg = tiny_config(tiny_random_model_dir, "fisft+-", method={"surrogate": "clipped"})
    setup = build(cfg)
    assert (setup.params.alpha, setup.params.surrogate) == (0.5, "clipped")
    metrics = step(setup, 0, make_optimizer(setup)).metrics
    assert "optim/clip_frac" in metrics and "optim/ratio_mean" in metrics
    plain = build(tiny_config(tiny_random_model_dir, "fisft+-"))
    plain_metrics = step(plain, 0, make_optimizer(plain)).metrics
    assert "optim/clip_frac" not in plain_metrics  # the default F-ISFT loss is the likelihood
