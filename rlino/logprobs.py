"""Log-probabilities of chosen tokens through the output layer, without a (tokens, vocab) tensor kept alive.

`selective_log_softmax(hidden, weight, targets)` = log softmax(hidden @ weight.T)[targets], computed
a chunk of rows at a time. Its backward recomputes each chunk's logits and writes the gradient in
place (d logp / d logits = onehot(target) - softmax), so memory stays at one chunk of logits and
no autograd graph through the vocabulary is ever stored. For a 49k vocabulary on CPU this is
several times faster than autograd through a checkpointed log-softmax, which allocates and faults
in a handful of (chunk, vocab) buffers per chunk.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 128
"""Rows per chunk: 128 x 49k fp32 logits is 25 MB, small enough for the allocator to reuse."""


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (M,)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (M,)
        for i in range(0, n, chunk):
            logits = (hidden[i : i + chunk] @ weight.T).float()  # (c, V)
            lse[i : i + chunk] = logits.logsumexp(dim=-1)
            logp[i : i + chunk] = (
                logits.gather(1, targets[i : i + chunk, None]).squeeze(1) - lse[i : i + chunk]
            )
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return logp

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i : i + chunk]  # (c, D)
            g = grad[i : i + chunk].float()  # (c,)
            d = (h @ weight.T).float()  # (c, V) logits again
            d.sub_(lse[i : i + chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax
            d[torch.arange(h.shape[0], device=d.device), targets[i : i + chunk]] += (
                g  # + g * onehot
            )
            if grad_hidden is not None:
                grad_hidden[i : i + chunk] = (d.to(weight.dtype) @ weight).to(
                    hidden.dtype
                )  # (c, D)
            if grad_weight is not None:
                grad_weight.addmm_(d.T, h.float())  # (V, D)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def selective_log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """(M,) log softmax(hidden @ weight.T) at `targets`, for (M, D) hidden, (V, D) weight, (M,) targets."""
    return _SelectiveLogSoftmax.apply(hidden, weight, targets, chunk)
