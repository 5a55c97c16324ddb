"""Log-probabilities of chosen tokens through the output layer, without a (tokens, vocab) tensor kept alive.

`selective_log_softmax(hidden, weight, targets)` = log softmax(hidden @ weight.T)[targets], computed
a chunk of rows at a time. Its backward recomputes each chunk's logits and writes the gradient in
place (d logp / d logits = onehot(target) - softmax), so memory stays at one chunk of logits and
no autograd graph through the vocabulary is ever stored. For a 49k vocabulary on CPU this is
several times faster than autograd through a checkpointed log-softmax, which allocates and faults
in a handful of (chunk, vocab) buffers per chunk.

Under `torch.autocast` the matmuls of both passes run in the autocast dtype (a custom autograd
function's backward would otherwise run in fp32); the softmax arithmetic stays fp32 and the
weight's gradient is accumulated in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 128
"""Rows per chunk: 128 x 49k fp32 logits is 25 MB, small enough for the allocator to reuse."""
WEIGHT_GRAD_ROWS = 512
"""Rows per weight-gradient matmul in the backward (their d logp / d logits: 512 x 49k x 4 B = 100 MB)."""
LOW_PRECISION_WEIGHT_GRAD_ROWS = 2048
"""In bf16/fp16, up to this many rows make one weight-gradient product, rounded once into the
weight's dtype: no fp32 (V, D) accumulator to zero-fill, add into and cast back every micro-batch.
Below about 2,800 rows (SmolLM2: D = 576) this also holds less memory than 512-row blocks plus
that accumulator and its casts (2048 x 49k x 2 B = 200 MB)."""


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        n = hidden.shape[0]
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            compute = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(compute), weight.to(compute)
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
        grad_hidden = (
            torch.empty(hidden.shape, dtype=ctx.hidden_dtype, device=hidden.device)
            if ctx.needs_input_grad[0]
            else None
        )
        n, low = hidden.shape[0], weight.element_size() < 4  # bf16/fp16 matmuls
        wants_weight = ctx.needs_input_grad[1]
        # d logp / d logits of a block of rows, kept (in the matmul dtype) until the block's weight
        # gradient is one matmul: per-chunk products would each write a whole (V, D) tensor.
        rows = LOW_PRECISION_WEIGHT_GRAD_ROWS if low else WEIGHT_GRAD_ROWS
        block_rows = min(n, max(chunk, rows)) if wants_weight else chunk
        one_product = low and block_rows == n  # the weight gradient is a single bf16 matmul
        grad_weight = (
            torch.zeros(
                weight.shape,
                dtype=torch.promote_types(weight.dtype, torch.float32),
                device=weight.device,
            )
            if wants_weight and not one_product
            else None
        )
        dlogits = torch.empty(
            (min(n, block_rows), weight.shape[0]), dtype=weight.dtype, device=weight.device
        )
        for block in range(0, n, block_rows):
            stop = min(n, block + block_rows)
            for i in range(block, stop, chunk):
                j = min(stop, i + chunk)
                g = grad[i:j].float()  # (c,)
                d = (hidden[i:j] @ weight.T).float()  # (c, V) logits again
                d.sub_(lse[i:j, None]).exp_().mul_(-g[:, None])  # -g * softmax
                d[torch.arange(j - i, device=d.device), targets[i:j]] += g  # + g * onehot
                dlogits[i - block : j - block] = d
                if grad_hidden is not None:
                    grad_hidden[i:j] = (dlogits[i - block : j - block] @ weight).to(
                        ctx.hidden_dtype
                    )  # (c, D)
            if one_product:  # the only block: rounded once, as the fp32 sum below would be
                grad_weight = dlogits[:n].T @ hidden
            elif grad_weight is not None:
                d, h = dlogits[: stop - block], hidden[block:stop]
                if low:
                    grad_weight += d.T @ h  # (V, D), summed in fp32
                else:
                    grad_weight.addmm_(d.T, h.to(d.dtype))  # (V, D)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def selective_log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """(M,) log softmax(hidden @ weight.T) at `targets`, for (M, D) hidden, (V, D) weight, (M,) targets."""
    return _SelectiveLogSoftmax.apply(hidden, weight, targets, chunk)
