"""Mixed precision on a real (tiny, random) model: fp32 master weights, bf16 arithmetic.

The bug this guards against: with bf16 weights, AdamW steps of about the learning rate are below
bf16's resolution and most weights never move.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from rlino.methods import weigh
from rlino.policy import load_policy
from rlino.precision import ComputeCopy, add_in_slices, resolve_precision
from rlino.setup import Setup, build
from rlino.step import rollout
from rlino.update import TokenBatch, update


def test_resolve_precision() -> None:
    mixed = resolve_precision(torch.bfloat16, "fp32")
    assert mixed.mixed and mixed.master == torch.float32
    assert not resolve_precision(torch.bfloat16, "same").mixed
    assert not resolve_precision(torch.float32, "fp32").mixed


def test_compute_copy_casts_keeps_ties_and_moves_gradients(tiny_random_model_dir: Path) -> None:
    policy = load_policy(str(tiny_random_model_dir), device="cpu", dtype="fp32")
    copy = ComputeCopy(policy, torch.bfloat16)
    model = copy.policy.model
    assert copy.policy.dtype == torch.bfloat16 and copy.policy.tokenizer is policy.tokenizer
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for (name, a), (_, b) in zip(model.named_buffers(), policy.model.named_buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name  # RoPE tables untouched

    master = policy.model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        master.add_(0.5)
    copy.refresh()
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, master.detach().bfloat16())

    cast = model.model.layers[0].mlp.up_proj.weight
    for step in (1, 2):
        cast.grad = torch.full_like(cast, 0.25)
        copy.accumulate_grads()
        assert cast.grad is None
        assert master.grad.dtype == torch.float32 and bool((master.grad == 0.25 * step).all())


@pytest.mark.parametrize("size", [7, 64, 1000])
def test_add_in_slices_equals_the_plain_mixed_dtype_add(size: int) -> None:
    """Slices that do and do not divide the tensor (10 x 13) and one larger than it: the same
    fp32 sum as one mixed-dtype add, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    dst = torch.randn(10, 13, generator=gen)
    src = torch.randn(10, 13, generator=gen).bfloat16()
    expected = dst.clone().add_(src)
    add_in_slices(dst, src, size=size)
    assert dst.dtype == torch.float32 and torch.equal(dst, expected)
    strided = torch.randn(13, 10, generator=gen).T  # not contiguous: the plain add
    expected = strided.clone().add_(src)
    add_in_slices(strided, src, size=size)
    assert torch.equal(strided, expected)


def _setup_and_batch(model_dir: Path, **model: object) -> tuple[Setup, TokenBatch, torch.Tensor]:
    cfg = tiny_config(model_dir, "grpo", model=model, optim={"minibatch_size": 16, "lr": 1e-5})
    setup = build(cfg)
    scored = rollout(setup, 0)
    weights = weigh(setup.method, setup.params, scored)
    assert (weights != 0).any()
    return setup, TokenBatch.from_rollouts(scored.rollouts, setup.policy.device), weights


def _changed_fraction(before: list[torch.Tensor], model: torch.nn.Module) -> float:
    changed = sum(
        int((b != p.detach()).sum()) for b, p in zip(before, model.parameters(), strict=True)
    )
    return changed / sum(b.numel() for b in before)


def test_bf16_with_fp32_master_trains_where_bf16_weights_do_not(
    tiny_random_model_dir: Path,
) -> None:
    """One AdamW step at lr 1e-5: the fp32 master moves nearly every weight and the bf16 compute
    copy then holds exactly the rounded master; plain bf16 weights (master_dtype same) barely move."""
    setup, batch, weights = _setup_and_batch(tiny_random_model_dir, dtype="bf16")
    master, copy = setup.policy.model, setup.compute_copy
    assert copy is not None and setup.compute_policy is copy.policy
    assert {p.dtype for p in master.parameters()} == {torch.float32}
    before = [p.detach().clone() for p in master.parameters()]
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-5, weight_decay=0.0)
    update(setup, batch, weights, optimizer)
    assert _changed_fraction(before, master) > 0.9
    for cast, param in zip(copy.policy.model.parameters(), master.parameters(), strict=True):
        assert torch.equal(cast, param.detach().bfloat16())
        assert cast.grad is None

    plain = build(dataclasses.replace(setup.config, model=dataclasses.replace(
        setup.config.model, master_dtype="same"
    )))  # fmt: skip
    assert plain.compute_copy is None
    assert {p.dtype for p in plain.policy.model.parameters()} == {torch.bfloat16}
    before = [p.detach().clone() for p in plain.policy.model.parameters()]
    optimizer = torch.optim.AdamW(plain.policy.model.parameters(), lr=1e-5, weight_decay=0.0)
    update(plain, batch, weights, optimizer)
    assert _changed_fraction(before, plain.policy.model) < 0.3


def test_mixed_precision_gradient_is_close_to_fp32(tiny_random_model_dir: Path) -> None:
    """The same rollout batch: the fp32 master's gradient from bf16 arithmetic is the fp32
    gradient up to bf16 rounding."""
    exact, batch, weights = _setup_and_batch(tiny_random_model_dir, dtype="fp32")
    mixed = build(dataclasses.replace(exact.config, model=dataclasses.replace(
        exact.config.model, dtype="bf16"
    )))  # fmt: skip

    def gradient(setup: Setup) -> torch.Tensor:
        model = setup.policy.model
        update(setup, batch, weights, torch.optim.SGD(model.parameters(), lr=0.0))
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g32, g16 = gradient(exact), gradient(mixed)
    assert g16.dtype == torch.float32
    assert float((g16 - g32).norm() / g32.norm()) < 0.05
    assert not torch.equal(g16, g32)


@pytest.mark.parametrize("value", ["bf16", "fp16"])
def test_bad_master_dtype_is_a_user_error(tiny_random_model_dir: Path, value: str) -> None:
    from rlino.errors import UserError

    with pytest.raises(UserError, match=r"model\.master_dtype must be fp32 or same"):
        tiny_config(tiny_random_model_dir, model={"master_dtype": value})


def test_fp16_loss_scaling_skips_overflowing_steps(tiny_random_model_dir: Path) -> None:
    """fp16 compute gets a loss scaler: a scale that makes the fp16 gradients overflow skips the
    step (weights unchanged, scale halved); a sane scale steps the fp32 master weights."""
    setup, batch, weights = _setup_and_batch(tiny_random_model_dir, dtype="fp16")
    assert setup.scaler is not None and setup.scaler.is_enabled()
    assert not build(dataclasses.replace(setup.config, model=dataclasses.replace(
        setup.config.model, dtype="bf16"
    ))).scaler.is_enabled()  # fmt: skip
    master = setup.policy.model
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-5, weight_decay=0.0)
    before = [p.detach().clone() for p in master.parameters()]

    setup.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    stats = update(setup, batch, weights, optimizer)
    assert stats["optim/skipped_steps"] == 1 and stats["optim/grad_norm"] is None
    assert stats["optim/loss_scale"] == 2.0**99
    assert _changed_fraction(before, master) == 0

    setup.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    stats = update(setup, batch, weights, optimizer)
    assert stats["optim/skipped_steps"] == 0 and stats["optim/grad_norm"] > 0
    assert _changed_fraction(before, master) > 0.9
    for cast, param in zip(
        setup.compute_policy.model.parameters(), master.parameters(), strict=True
    ):
        assert cast.dtype == torch.float16 and torch.equal(cast, param.detach().half())
