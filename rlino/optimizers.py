"""The optimiser a run trains with: torch's AdamW, or torchao's 8-bit AdamW (the memory-lean mode).

Why an 8-bit mode: with fp32 master weights a run holds 16 bytes per parameter before any
activation (weights, gradients and AdamW's two fp32 moments, 8 of those 16 bytes); the moments
are the largest share that training does not need at full precision. torchao's `AdamW8bit`
(the maintained port of bitsandbytes' block-wise 8-bit Adam to plain PyTorch, CPU included)
keeps each moment as 8-bit codes with one fp32 scale per block of 256 values, about 2 bytes per
parameter for both, so SmolLM2-135M's moments shrink from 1.08 GB to about 0.28 GB. Tensors of
fewer than 4,096 values (norm weights, biases) keep fp32 moments, as in bitsandbytes.

What it costs: the moments are rounded every step (the accuracy cost is measured in the README),
and torchao compiles its per-parameter update with `torch.compile` on the first step (on CPU that
needs a C++ compiler; tens of seconds per new parameter shape, cached on disk afterwards), and
its step is slower than torch's AdamW on CPU (a SmolLM2 update took 1.65x as long; README). Its
learning rate lives in a tensor, which the schedulers update in place; its state dict round-trips
through a checkpoint as it is (8-bit codes and scales), and resuming with the other optimiser is
refused (`check_resumable`). Not with `dist.strategy: fsdp` (the sharded state gathering in
rlino.fsdp handles plain tensors only).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rlino.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: rlino.config imports this module
    import torch

OPTIMIZERS = ("adamw", "adamw8bit")
"""the names `optim.optimizer` accepts"""


def lean_unavailable_reason() -> str | None:
    """Why `adamw8bit` cannot run here (torchao missing, or no C++ compiler for torch.compile)."""
    if importlib.util.find_spec("torchao") is None:
        return "optim.optimizer adamw8bit needs torchao: pip install torchao"
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return (
            "optim.optimizer adamw8bit compiles its update with torch.compile, "
            "which needs a C++ compiler (g++ or clang++)"
        )
    return None


def _adamw8bit() -> type[torch.optim.Optimizer]:
    """torchao's AdamW8bit (its import-time log noise is filtered in rlino/__init__.py)."""
    from torchao.optim import AdamW8bit

    # torchao's state tensors do not implement a hash for the AOT autograd cache; harmless.
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    return AdamW8bit


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimiser `name` (one of OPTIMIZERS) over `params`; UserError if it cannot run here."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        reason = lean_unavailable_reason()
        if reason is not None:
            raise UserError(reason)
        return _adamw8bit()(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"optim.optimizer must be one of {', '.join(OPTIMIZERS)} (got {name!r})")


def check_resumable(state: dict, optimizer: torch.optim.Optimizer, where: str) -> None:
    """UserError if the optimiser state `state` (a checkpoint's, from `where`) was written by the
    other optimiser: loading 8-bit moments into torch's AdamW, or fp32 ones into AdamW8bit, would
    not fail but train on with the wrong kind of state (AdamW8bit would keep fp32 moments)."""
    import torch

    values = [value for entry in state.get("state", {}).values() for value in entry.values()]
    saved_lean = any(type(value).__name__ == "OptimState8bit" for value in values)
    lean = type(optimizer).__name__ == "AdamW8bit"
    if saved_lean and not lean:
        raise UserError(
            f"{where} holds 8-bit AdamW state; resume with --set optim.optimizer=adamw8bit"
        )
    quantisable = any(isinstance(v, torch.Tensor) and v.numel() >= 4096 for v in values)
    if lean and not saved_lean and quantisable:
        raise UserError(f"{where} holds fp32 AdamW state; resume with --set optim.optimizer=adamw")
