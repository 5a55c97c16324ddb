"""`model.attention`: the policy (and its bf16 compute copy) run the chosen attention
implementation, with the same gradient as the model's default one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from rlino.errors import UserError
from rlino.methods import weigh
from rlino.setup import build
from rlino.step import rollout
from rlino.update import MicroBatching, TokenBatch, accumulate_gradients


def _gradient(model_dir: Path, attention: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The compute model's attention implementation and its gradient on iteration 0's batch."""
    setup = build(tiny_config(model_dir, "grpo", model={"attention": attention}))
    scored = rollout(setup, 0)
    weights = weigh(setup.method, setup.params, scored).reshape(-1)
    batch = TokenBatch.from_rollouts(scored.rollouts, setup.policy.device)
    model = setup.compute_policy.model
    rows = torch.arange(len(batch))
    model.train()
    accumulate_gradients(
        model, batch, setup.method, setup.params, weights, rows, rows, MicroBatching(16)
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model.config._attn_implementation, grads


def test_eager_attention_gives_the_default_gradient(tiny_random_model_dir: Path) -> None:
    default_impl, default = _gradient(tiny_random_model_dir, "auto")
    eager_impl, eager = _gradient(tiny_random_model_dir, "eager")
    assert default_impl == "sdpa" and eager_impl == "eager"
    assert default.keys() == eager.keys() and default
    for name, g in default.items():
        torch.testing.assert_close(eager[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_compute_copy_and_the_reference_take_the_choice(tiny_random_model_dir: Path) -> None:
    cfg = tiny_config(
        tiny_random_model_dir,
        "grpo",
        model={"attention": "eager", "dtype": "bf16"},
        method={"beta": 0.04},
    )
    setup = build(cfg)
    assert setup.compute_copy is not None and setup.reference is not None
    for model in (setup.policy.model, setup.compute_policy.model, setup.reference.model):
        assert model.config._attn_implementation == "eager"


def test_an_unknown_attention_is_a_config_error(tiny_random_model_dir: Path) -> None:
    with pytest.raises(UserError, match=r"model\.attention must be auto, sdpa or eager"):
        tiny_config(tiny_random_model_dir, "grpo", model={"attention": "flash"})
