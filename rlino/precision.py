"""Mixed precision: fp32 master weights, trained through bf16 (or fp16) arithmetic.

Why: AdamW moves each weight by about the learning rate per step. At the paper's lr of 1e-6 that
is far below the spacing of bf16 numbers near typical weights (2^-8 relative), so a model whose
weights *are* bf16 barely trains: one AdamW step at lr 1e-6 on the bf16 tiny base changed 0.5% of
its weights (measured). verl (FSDP with bf16 parameters, fp32 gradients) and TRL (bf16 autocast)
keep fp32 weights and optimizer state and compute in bf16; rlino does so whenever `model.dtype` is
bf16/fp16 and `model.master_dtype` is fp32 (the default), the way verl does:

- the policy that is trained holds fp32 master parameters, and the optimizer steps those;
- a copy of it in the compute dtype (`ComputeCopy`) does all the arithmetic: sampling, evaluation,
  and the update's forward and backward passes. After each micro-batch's backward its bf16
  gradients are added into the master's fp32 gradients; after each optimizer step the master
  weights are copied (rounded) back into it. So the policy sampled is exactly the policy whose
  log-probabilities the update differentiates, and, unlike under `torch.autocast`, no weight is
  cast again on every forward pass (measured on SmolLM2-135M, 2 CPU cores, 32 rows of 128 new
  tokens: casts were 14% of an autocast update, which took 22-23 s; this way it takes 18 s);
- the frozen reference model, never updated, is simply loaded in the compute dtype;
- fp16, whose range is narrow, also gets dynamic loss scaling (`torch.amp.GradScaler`): the loss
  is multiplied up before the backward pass so that small gradients survive in fp16, the fp32
  gradients are divided back before clipping, and a step whose gradients overflowed is skipped
  (the scale then halves). bf16 has fp32's range and needs none.

With `master_dtype: same` the weights are kept in the compute dtype (the old, memory-light way).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rlino.policy import Policy


@dataclass(frozen=True)
class Precision:
    """The dtype arithmetic runs in, and the dtype the trained weights are kept in."""

    compute: torch.dtype
    """forward/backward, sampling and evaluation"""
    master: torch.dtype
    """trained parameters and optimizer state"""

    @property
    def mixed(self) -> bool:
        """Do the two differ (so a compute copy does the arithmetic)?"""
        return self.compute != self.master

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A loss scaler, enabled for fp16 compute with fp32 master weights (a no-op otherwise)."""
        enabled = self.mixed and self.compute == torch.float16
        return torch.amp.GradScaler(device.type, enabled=enabled)


def resolve_precision(compute: torch.dtype, master_dtype: str) -> Precision:
    """`master_dtype` 'fp32' keeps fp32 weights under a low-precision compute dtype; 'same' does not."""
    master = torch.float32 if master_dtype == "fp32" else compute
    return Precision(compute=compute, master=master)


ADD_SLICE = 1 << 20
"""Elements per slice when adding a low-precision gradient into an fp32 one (4 MB of fp32)."""


def add_in_slices(dst: torch.Tensor, src: torch.Tensor, size: int = ADD_SLICE) -> None:
    """`dst += src` for tensors of different dtypes, a slice at a time.

    On CPU a mixed-dtype in-place add first casts all of `src` into a temporary of `dst`'s dtype:
    for SmolLM2's [49152, 576] embedding that is a fresh 113 MB buffer per micro-batch, faulted
    in page by page. Slices keep the cast temporary small and in cache (2.3-3x faster for that
    tensor, measured with one thread on a loaded 2-core machine); the sum is the same, element
    by element. Tensors of one dtype, or not contiguous, take the plain add.
    """
    if dst.dtype == src.dtype or not (dst.is_contiguous() and src.is_contiguous()):
        dst.add_(src)
        return
    flat_dst, flat_src = dst.view(-1), src.view(-1)
    for i in range(0, flat_dst.numel(), size):
        flat_dst[i : i + size].add_(flat_src[i : i + size])


class ComputeCopy:
    """A copy of a policy with its parameters in a lower dtype, which does the arithmetic.

    Built without ever holding a second fp32 copy: the parameters are swapped for their casts while
    the model is deep-copied (buffers such as RoPE frequencies are copied as they are). Tied
    parameters stay tied. `accumulate_grads()` moves the copy's gradients into the master's;
    `refresh()` copies the master weights in again after an optimizer step.
    """

    def __init__(self, master: Policy, dtype: torch.dtype) -> None:
        pairs: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        for param in master.model.parameters():
            cast = torch.nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
            pairs[id(param)] = (cast, param)
        memo: dict[int, object] = {key: cast for key, (cast, _) in pairs.items()}
        model = copy.deepcopy(master.model, memo)
        model.eval()
        self.pairs = list(pairs.values())
        self.policy = replace(master, model=model, dtype=dtype)

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add the copy's gradients into the master's (in fp32) and clear them."""
        for cast, param in self.pairs:
            if cast.grad is None:
                continue
            if param.grad is None:
                param.grad = cast.grad.to(param.dtype)
            else:
                add_in_slices(param.grad, cast.grad)
            cast.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy (and round) the master's current weights into the copy."""
        for cast, param in self.pairs:
            cast.copy_(param)
