"""`optim.optimizer`: torch's AdamW, or torchao's 8-bit AdamW (the memory-lean mode)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from rlino import optimizers
from rlino.config import load_config
from rlino.errors import UserError
from rlino.resolve import tiny_model_dir
from rlino.setup import make_scheduler
from rlino.train import train

needs_torchao = pytest.mark.skipif(
    optimizers.lean_unavailable_reason() is not None,
    reason=str(optimizers.lean_unavailable_reason()),
)


def _model() -> torch.nn.Module:
    """Two 128x128 layers: one parameter shape (torchao compiles its update once per shape), each
    large enough (16,384 values) for 8-bit moments."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(128, 128, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(128, 128, bias=False),
    )


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimiser's state holds as stored: a tensor subclass (torchao's 8-bit state)
    counts the tensors it is made of (its codes, scales and code book)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            parts = [value]
            if hasattr(value, "__tensor_flatten__"):
                names, _ = value.__tensor_flatten__()
                parts = [getattr(value, name) for name in names]
            total += sum(part.numel() * part.element_size() for part in parts)
    return total


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 128, generator=gen)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@needs_torchao
@pytest.mark.slow
def test_adamw8bit_steps_like_adamw_with_a_quarter_of_the_state_and_resumes() -> None:
    plain_model, lean_model = _model(), _model()
    plain = optimizers.make_optimizer("adamw", plain_model.parameters(), 1e-2, 0.01)
    lean = optimizers.make_optimizer("adamw8bit", lean_model.parameters(), 1e-2, 0.01)
    before = [p.detach().clone() for p in plain_model.parameters()]
    _step(plain_model, plain, 0)
    _step(lean_model, lean, 0)
    for p0, pa, pb in zip(before, plain_model.parameters(), lean_model.parameters(), strict=True):
        moved_plain, moved_lean = pa.detach() - p0, pb.detach() - p0
        assert moved_plain.abs().max() > 5e-3  # AdamW's first step moves every weight by ~lr
        # 8-bit moments: the step is AdamW's up to the rounding of m and v.
        assert torch.allclose(moved_lean, moved_plain, atol=2e-3)
        assert (moved_lean - moved_plain).abs().mean() < 3e-4

    assert type(lean.state[lean_model[0].weight]["exp_avg"]).__name__ == "OptimState8bit"
    ratio = _state_bytes(lean) / _state_bytes(plain)
    assert 0.2 < ratio < 0.3  # 2 x 1 byte + a 4-byte scale per 256 values, vs 2 x 4 bytes

    # A checkpoint round trip (rlino saves with torch.save, loads with weights_only=True)
    # continues exactly where the saved optimiser would have gone.
    buffer = io.BytesIO()
    torch.save(lean.state_dict(), buffer)
    twin_model = _model()
    twin_model.load_state_dict(lean_model.state_dict())
    twin = optimizers.make_optimizer("adamw8bit", twin_model.parameters(), 1e-2, 0.01)
    buffer.seek(0)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    _step(lean_model, lean, 1)
    _step(twin_model, twin, 1)
    for pa, pb in zip(lean_model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(pa, pb)

    # Resuming with the other optimiser is a user error, not a silent switch of state kind.
    with pytest.raises(UserError, match=r"ckpt holds 8-bit AdamW state; .*optimizer=adamw8bit"):
        optimizers.check_resumable(lean.state_dict(), plain, "ckpt")
    with pytest.raises(UserError, match=r"ckpt holds fp32 AdamW state; .*optimizer=adamw$"):
        optimizers.check_resumable(plain.state_dict(), twin, "ckpt")
    optimizers.check_resumable(lean.state_dict(), twin, "ckpt")
    optimizers.check_resumable(plain.state_dict(), plain, "ckpt")

    # The schedulers update its tensor learning rate in place; the loop logs it as a float.
    config = load_config(None, {"iterations": 10, "optim": {"schedule": "linear"}})
    scheduler = make_scheduler(lean, config)
    _step(lean_model, lean, 2)
    scheduler.step()
    assert isinstance(lean.param_groups[0]["lr"], torch.Tensor)
    assert float(lean.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.9)


def test_an_unknown_optimizer_is_a_config_error(tiny_random_model_dir: Path) -> None:
    with pytest.raises(UserError, match=r"optim\.optimizer must be one of adamw, adamw8bit"):
        tiny_config(tiny_random_model_dir, "grpo", optim={"optimizer": "sgd"})


def test_adamw8bit_with_fsdp_is_a_config_error(tiny_random_model_dir: Path) -> None:
    with pytest.raises(UserError, match=r"adamw8bit does not work with dist\.strategy fsdp"):
        tiny_config(
            tiny_random_model_dir,
            "grpo",
            optim={"optimizer": "adamw8bit"},
            dist={"strategy": "fsdp"},
        )


def test_adamw8bit_without_torchao_or_a_compiler_says_what_to_install(
    tiny_random_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = optimizers.importlib.util.find_spec
    monkeypatch.setattr(
        optimizers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torchao" else real_find_spec(name, *a),
    )
    with pytest.raises(UserError, match=r"adamw8bit needs torchao: pip install torchao"):
        tiny_config(tiny_random_model_dir, "grpo", optim={"optimizer": "adamw8bit"})
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", real_find_spec)
    if real_find_spec("torchao") is None:
        return
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"needs a C\+\+ compiler"):
        optimizers.make_optimizer("adamw8bit", _model().parameters(), 1e-3, 0.0)


@needs_torchao
def test_resuming_with_the_other_optimizer_is_refused_and_leaves_the_run_as_it_was(
    tmp_path: Path,
) -> None:
    # The built-in tiny base: its matrices are large enough for 8-bit moments. No 8-bit step runs
    # (the resume is refused before one), so nothing is compiled.
    base = tiny_model_dir()
    cfg = tiny_config(base, "grpo", task={"name": "countdown"}, iterations=1)
    run = tmp_path / "run"
    assert train(cfg, run, progress=False).completed
    before = (run / "config.yaml").read_bytes()
    lean = tiny_config(
        base,
        "grpo",
        task={"name": "countdown"},
        iterations=2,
        optim={"optimizer": "adamw8bit"},
    )
    with pytest.raises(UserError, match=r"holds fp32 AdamW state; resume with .*optimizer=adamw"):
        train(lean, run, resume=True, progress=False)
    assert (run / "config.yaml").read_bytes() == before
