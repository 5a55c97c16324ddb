"""The policy update on one rollout batch: frozen log-probs, micro-batched gradients, optimiser steps.

`accumulate_gradients` is the one place a method's loss is turned into gradients, micro-batch by
micro-batch, so that the sum equals one pass over the whole minibatch; the training update and
`rlino analyze equivalence` both call it. `update` runs mu passes of minibatched optimiser steps on
top of it, under mixed precision on the compute copy (see `rlino.precision`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlino.losses import micro_batch_share, policy_loss
from rlino.methods import Method, MethodParams
from rlino.policy import token_logprobs_and_entropy

if TYPE_CHECKING:
    from rlino.rollout import Rollouts
    from rlino.setup import Setup


@dataclass
class TokenBatch:
    """A rollout batch laid out for scoring: prompt and completion side by side, on the device."""

    ids: torch.Tensor  # (N, Lp + Lc), prompts left-padded
    attn: torch.Tensor  # (N, Lp + Lc)
    mask: torch.Tensor  # (N, Lc) bool, real completion tokens
    start: int  # first completion column

    @classmethod
    def from_rollouts(cls, r: Rollouts, device: torch.device) -> TokenBatch:
        """Concatenate prompts and completions of `r` and move them to `device`."""
        return cls(
            ids=torch.cat([r.prompt_ids, r.completion_ids], dim=1).to(device),
            attn=torch.cat([r.prompt_mask, r.completion_mask], dim=1).to(device),
            mask=r.completion_mask.to(device),
            start=r.prompt_ids.shape[1],
        )

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass(frozen=True)
class MicroBatching:
    """How rows are cut into forward/backward passes: a row cap and a padded-token cap (0 = none)."""

    max_rows: int
    max_tokens: int = 0


def micro_slices(
    batch: TokenBatch, rows: torch.Tensor, cut: MicroBatching
) -> Iterator[torch.Tensor]:
    """Consecutive slices of `rows` of at most `max_rows` rows whose padded size fits `max_tokens`.

    A slice's padded size is what `batch_logprobs` runs: rows x (longest prompt + longest
    completion among them). A single row always forms a slice, however long. Why a token budget:
    activation memory grows with tokens, not samples; with 128-token completions a 135M model
    keeps about 1.7 MB per token (fp32), so 32 samples at once need ~9 GB.
    """
    prompt_lens = batch.attn[rows, : batch.start].sum(dim=1).tolist()
    completion_lens = batch.attn[rows, batch.start :].sum(dim=1).tolist()
    first, prompt_max, completion_max = 0, 0, 0
    for i, (prompt_len, completion_len) in enumerate(
        zip(prompt_lens, completion_lens, strict=True)
    ):
        count = i - first + 1
        width = max(prompt_max, prompt_len) + max(completion_max, completion_len)
        over_tokens = cut.max_tokens and count * width > cut.max_tokens
        if count > 1 and (count > cut.max_rows or over_tokens):
            yield rows[first:i]
            first, prompt_max, completion_max = i, 0, 0
        prompt_max = max(prompt_max, prompt_len)
        completion_max = max(completion_max, completion_len)
    if prompt_lens:
        yield rows[first:]


def batch_logprobs(model: torch.nn.Module, batch: TokenBatch, rows: torch.Tensor) -> torch.Tensor:
    """Completion log-probs of `rows`, (n, width), with the padding columns all rows share cut off."""
    ids, attn, start = batch.ids, batch.attn, batch.start
    left = int(attn[rows, :start].any(dim=0).long().argmax())  # first prompt column in use
    right = start + int(attn[rows, start:].sum(dim=1).max())  # last completion column in use
    logp, _ = token_logprobs_and_entropy(
        model, ids[rows, left:right], attn[rows, left:right], start - left, with_entropy=False
    )
    return logp  # (n, right - start)


def frozen_logprobs(model: torch.nn.Module, batch: TokenBatch, cut: MicroBatching) -> torch.Tensor:
    """(N, Lc) completion log-probs without gradient: old (sampling-time) or reference log-probs."""
    out = torch.zeros(batch.mask.shape, device=batch.mask.device)
    all_rows = torch.arange(len(batch), device=batch.mask.device)
    with torch.no_grad():
        for rows in micro_slices(batch, all_rows, cut):
            logp = batch_logprobs(model, batch, rows)
            out[rows, : logp.shape[1]] = logp.float()
    return out


def accumulate_gradients(
    model: torch.nn.Module,
    batch: TokenBatch,
    method: Method,
    params: MethodParams,
    weights: torch.Tensor,
    rows: torch.Tensor,
    normaliser_rows: torch.Tensor,
    cut: MicroBatching,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> tuple[float, dict[str, float], float]:
    """Backward of the method's loss over `rows`, as one pass over `normaliser_rows` would give.

    weights: (N,) one per sample, or (N, Lc) one per token. `rows` may leave out samples that add
    nothing (weight 0, no KL); they still count in the loss's normaliser through
    `normaliser_rows`, so the gradient equals the naive computation over every sample. `backward`
    runs on each micro-batch's scaled loss (e.g. through an fp16 loss scaler, then adding the
    compute copy's gradients into the master's). Returns (loss, stats, share run): the loss and
    the stats weighted by each micro-batch's share; dividing the stats by the share run gives
    their mean over the rows actually run.
    """
    loss_total, share_total = 0.0, 0.0
    totals: dict[str, float] = {}
    for micro in micro_slices(batch, rows, cut):
        logp = batch_logprobs(model, batch, micro)
        width = logp.shape[1]
        mask = batch.mask[micro, :width]
        w = weights[micro] if weights.dim() == 1 else weights[micro, :width]
        loss, stats = policy_loss(
            method,
            params,
            logp.float(),
            mask,
            w,
            old_logp=None if old_logp is None else old_logp[micro, :width],
            ref_logp=None if ref_logp is None else ref_logp[micro, :width],
        )
        share = micro_batch_share(
            batch.mask[micro], batch.mask[normaliser_rows], params.aggregation
        )
        backward(loss * share)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + float(value) * share
        loss_total += float(loss.detach()) * share
        share_total += share
    return loss_total, totals, share_total


def optimizer_step(setup: Setup, optimizer: torch.optim.Optimizer) -> float | None:
    """Unscale, clip and step the master weights, then refresh the compute copy.

    Returns the gradient norm before clipping, or None when fp16 loss scaling skipped the step
    because the gradients overflowed.
    """
    scaler = setup.scaler
    scaler.unscale_(optimizer)
    clip = setup.config.optim.grad_clip if setup.config.optim.grad_clip > 0 else math.inf
    norm = float(torch.nn.utils.clip_grad_norm_(setup.policy.model.parameters(), clip))
    scale = scaler.get_scale()
    scaler.step(optimizer)  # a no-op if the gradients overflowed
    scaler.update()
    if setup.compute_copy is not None:
        setup.compute_copy.refresh()
    return None if scaler.is_enabled() and scaler.get_scale() < scale else norm


def update(
    setup: Setup, batch: TokenBatch, weights: torch.Tensor, optimizer: torch.optim.Optimizer
) -> dict[str, float]:
    """mu passes of minibatched, gradient-accumulated optimiser steps on one rollout batch.

    weights: (P, G) or (N,) per sample, or (N, Lc) per token. Samples whose weights are all 0
    (filtered groups) add nothing to the policy gradient, so they are not run through the model
    unless a KL term needs them; they still count in the loss's normaliser.
    """
    cfg, params, method = setup.config, setup.params, setup.method
    model = setup.compute_policy.model  # runs every pass: the policy, or its compute-dtype copy
    device = setup.policy.device
    weights = weights.to(device)
    if weights.dim() == 2 and weights.shape != batch.mask.shape:
        weights = weights.reshape(-1)  # (P, G) -> (N,)
    n = len(batch)
    has_weight = weights != 0 if weights.dim() == 1 else (weights != 0).any(dim=1)  # (N,)
    needs_kl = setup.reference is not None
    needs_old = method.surrogate == "clipped" and (params.mu > 1 or cfg.optim.minibatch_size < n)
    cut = MicroBatching(cfg.optim.micro_batch_size, cfg.optim.micro_batch_tokens)

    model.eval()
    old_logp = frozen_logprobs(model, batch, cut) if needs_old else None
    ref_logp = frozen_logprobs(setup.reference.model, batch, cut) if needs_kl else None
    model.train()

    def backward(loss: torch.Tensor) -> None:
        setup.scaler.scale(loss).backward()
        if setup.compute_copy is not None:
            setup.compute_copy.accumulate_grads()

    loss_total, share_total = 0.0, 0.0
    stat_totals: dict[str, float] = {}
    steps = skipped = 0
    grad_norms = []
    all_rows = torch.arange(n, device=device)
    for _ in range(params.mu):
        for mb in all_rows.split(cfg.optim.minibatch_size):
            optimizer.zero_grad(set_to_none=False)
            active = mb if needs_kl else mb[has_weight[mb]]
            loss, stats, share = accumulate_gradients(
                model,
                batch,
                method,
                params,
                weights,
                active,
                mb,
                cut,
                old_logp=old_logp,
                ref_logp=ref_logp,
                backward=backward,
            )
            loss_total += loss
            share_total += share
            for key, value in stats.items():
                stat_totals[key] = stat_totals.get(key, 0.0) + value
            norm = optimizer_step(setup, optimizer)
            if norm is None:
                skipped += 1
            else:
                grad_norms.append(norm)
            steps += 1
    # The loss is the minibatch loss (skipped rows add 0 to it); the other statistics (ratio,
    # clipping, KL) are means over the rows that were actually run through the model.
    out = {key: value / share_total for key, value in stat_totals.items()}
    out["loss"] = loss_total / steps
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else None
    out["optimizer_steps"] = steps
    if setup.scaler.is_enabled():
        out["optim/skipped_steps"] = skipped  # overflowed fp16 gradients
        out["optim/loss_scale"] = setup.scaler.get_scale()
    return out
