"""The policy update on one rollout batch: frozen log-probs, micro-batched gradients, optimiser steps.

`accumulate_gradients` is the one place a method's loss is turned into gradients, micro-batch by
micro-batch, so that the sum equals one pass over the whole minibatch; the training update and
`rlino analyze equivalence` both call it. `update` runs mu passes of minibatched optimiser steps on
top of it, under mixed precision on the compute copy (see `rlino.precision`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlino import fsdp
from rlino.errors import UserError
from rlino.losses import micro_batch_share, normaliser_count, policy_loss
from rlino.methods import Method, MethodParams
from rlino.packing import model_layout, packed_logprobs, packed_slices
from rlino.policy import token_logprobs_and_entropy

if TYPE_CHECKING:
    from rlino.distributed import World
    from rlino.rollout import Rollouts
    from rlino.setup import Setup


@dataclass
class TokenBatch:
    """A rollout batch laid out for scoring: prompt and completion side by side, on the device."""

    ids: torch.Tensor  # (N, Lp + Lc), prompts left-padded
    attn: torch.Tensor  # (N, Lp + Lc)
    mask: torch.Tensor  # (N, Lc) bool, real completion tokens
    start: int  # first completion column
    temperature: float = 1.0
    """the sampling temperature: log-probs are those of logits / T, the policy that sampled"""

    @classmethod
    def from_rollouts(
        cls, r: Rollouts, device: torch.device, temperature: float = 1.0
    ) -> TokenBatch:
        """Concatenate prompts and completions of `r` and move them to `device`.

        `temperature` is the one the samples were drawn at (0, greedy, counts as 1): the update
        differentiates the log-probs of that same policy, as TRL and verl do.
        """
        return cls(
            ids=torch.cat([r.prompt_ids, r.completion_ids], dim=1).to(device),
            attn=torch.cat([r.prompt_mask, r.completion_mask], dim=1).to(device),
            mask=r.completion_mask.to(device),
            start=r.prompt_ids.shape[1],
            temperature=temperature if temperature > 0 else 1.0,
        )

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass(frozen=True)
class MicroBatching:
    """How rows are cut into forward/backward passes (a row cap and a token cap, 0 = none) and
    laid out in each: padded, or packed without padding (`rlino.packing`)."""

    max_rows: int
    max_tokens: int = 0
    packing: str = "none"
    """none (padded rows), pack or prefix (`rlino.packing`; the token cap counts real tokens)"""


def micro_slices(
    batch: TokenBatch, rows: torch.Tensor, cut: MicroBatching
) -> Iterator[torch.Tensor]:
    """Consecutive slices of `rows` of at most `max_rows` rows whose size fits `max_tokens`.

    A slice's size is what `batch_logprobs` runs: padded, rows x (longest prompt + longest
    completion among them); packed, the real tokens (`packed_slices`). A single row always forms
    a slice, however long. Why a token budget: activation memory grows with tokens, not samples;
    with 128-token completions a 135M model keeps about 1.7 MB per token (fp32), so 32 samples
    at once need ~9 GB.
    """
    if cut.packing != "none":
        share = cut.packing == "prefix"
        yield from packed_slices(batch, rows, cut.max_rows, cut.max_tokens, share)
        return
    prompt, completion = batch.attn[rows, : batch.start], batch.attn[rows, batch.start :]
    prompt_lens, completion_lens = torch.stack(
        [prompt.sum(dim=1).long(), completion.sum(dim=1).long()]
    ).tolist()  # one copy to the CPU
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


def padded_columns(batch: TokenBatch, rows: torch.Tensor) -> tuple[int, int]:
    """The columns [left, right) of `batch` the padded layout runs `rows` in: from the first
    prompt column any of them uses to the end of their longest completion (one copy to the CPU).

    With left-padded prompts and right-padded completions that is the longest prompt plus the
    longest completion, the width `micro_slices` budgets for.
    """
    attn, start = batch.attn, batch.start
    left = attn[rows, :start].any(dim=0).long().argmax()  # first prompt column in use
    right = start + attn[rows, start:].sum(dim=1).max().long()  # last completion column in use
    left_col, right_col = torch.stack([left, right]).tolist()
    return left_col, right_col


def tokens_computed(
    model: torch.nn.Module, batch: TokenBatch, rows: torch.Tensor, cut: MicroBatching
) -> tuple[int, int]:
    """Tokens the update puts through `model` for `rows`, padding and filler included, and the
    number of micro-batches it runs them in.

    Cut by `micro_slices` and laid out as `batch_logprobs` lays each slice out: padded, rows x the
    columns `padded_columns` keeps; pack or prefix, every position of the packed sequences
    (`rlino.packing.model_layout`, the filler that ends each one counted, a shared prompt once).
    The benchmarks compare this with the real tokens to show what a layout costs; taking it from
    the very functions the update calls keeps their count equal to the work done.
    """
    total = micros = 0
    for micro in micro_slices(batch, rows, cut):
        micros += 1
        if cut.packing == "none":
            left, right = padded_columns(batch, micro)
            total += len(micro) * (right - left)
        else:
            total += model_layout(model, batch, micro, cut.packing).source.numel()
    return total, micros


def batch_logprobs(
    model: torch.nn.Module, batch: TokenBatch, rows: torch.Tensor, packing: str = "none"
) -> torch.Tensor:
    """Completion log-probs of `rows`, (n, width), with the padding columns all rows share cut off.

    `packing` pack or prefix scores the same rows laid out without padding (`rlino.packing`).
    """
    if packing != "none":
        return packed_logprobs(model, batch, rows, packing)
    left, right = padded_columns(batch, rows)
    logp, _ = token_logprobs_and_entropy(
        model,
        batch.ids[rows, left:right],
        batch.attn[rows, left:right],
        batch.start - left,
        temperature=batch.temperature,
        with_entropy=False,
    )
    return logp  # (n, right - batch.start)


def frozen_logprobs(model: torch.nn.Module, batch: TokenBatch, cut: MicroBatching) -> torch.Tensor:
    """(N, Lc) completion log-probs without gradient: old (sampling-time) or reference log-probs."""
    out = torch.zeros(batch.mask.shape, device=batch.mask.device)
    all_rows = torch.arange(len(batch), device=batch.mask.device)
    with torch.no_grad():
        for rows in micro_slices(batch, all_rows, cut):
            logp = batch_logprobs(model, batch, rows, cut.packing)
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
    normaliser: float | None = None,
    world: World | None = None,
) -> dict[str, float]:
    """Backward of the method's loss over `rows`, as one pass over `normaliser_rows` would give.

    weights: (N,) one per sample, or (N, Lc) one per token. `rows` may leave out samples that add
    nothing (weight 0, no KL); they still count in the loss's normaliser through
    `normaliser_rows`, so the gradient equals the naive computation over every sample.
    `normaliser` overrides the count taken from `normaliser_rows` (`losses.normaliser_count`):
    a data-parallel rank passes the whole minibatch's count over all ranks. Under FSDP (`world`
    sharded) every rank runs as many passes as the rank with the most micro-batches, and the
    gradients are reduced over ranks in the last (rlino.fsdp.lockstep_passes). `backward`
    runs on each micro-batch's scaled loss (e.g. through an fp16 loss scaler, then adding the
    compute copy's gradients into the master's).

    Returns exact totals: `loss/policy`, `loss/kl`, `loss/total` and `kl` are the minibatch's own
    values (each micro-batch's times its share); `tokens` counts the tokens run, and for the
    clipped surrogate `clipped_tokens` and `ratio_sum` sum over them.
    """
    totals = dict.fromkeys(("loss/policy", "loss/kl", "loss/total", "kl", "tokens"), 0.0)
    if (params.surrogate or method.surrogate) == "clipped":
        totals.update(clipped_tokens=0.0, ratio_sum=0.0)
    if normaliser is None:
        normaliser = normaliser_count(batch.mask[normaliser_rows], params.aggregation)
    micros = list(micro_slices(batch, rows, cut))
    real = iter(micros)
    passes = (
        fsdp.lockstep_passes(model, world, len(micros))
        if world is not None and world.sharded
        else (True for _ in micros)
    )
    for is_real in passes:
        if not is_real:
            fsdp.idle_pass(model)
            continue
        micro = next(real)
        logp = batch_logprobs(model, batch, micro, cut.packing)
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
        share = micro_batch_share(batch.mask[micro], normaliser, params.aggregation)
        backward(loss * share)
        for key in ("loss/policy", "loss/kl", "loss/total", "kl"):
            totals[key] += stats[key] * share
        tokens = float(mask.sum())
        totals["tokens"] += tokens
        if "clip_frac" in stats:  # token means over this micro-batch -> token sums
            totals["clipped_tokens"] += stats["clip_frac"] * tokens
            totals["ratio_sum"] += stats["ratio_mean"] * tokens
    return totals


def token_means(totals: dict[str, float]) -> dict[str, float]:
    """clip_frac and ratio_mean over the tokens run, from `accumulate_gradients`' totals."""
    if "clipped_tokens" not in totals or not totals["tokens"]:
        return {}
    return {
        "clip_frac": totals["clipped_tokens"] / totals["tokens"],
        "ratio_mean": totals["ratio_sum"] / totals["tokens"],
    }


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """The trainable parameters' gradients as one fp32 vector (zeros where there is none)."""
    return torch.cat(
        [
            fsdp.full(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in model.parameters()
            if p.requires_grad
        ]
    )


NONFINITE = -1.0
"""`optimizer_step`'s answer for a step skipped because the loss or gradient was NaN/inf."""


def optimizer_step(
    setup: Setup, optimizer: torch.optim.Optimizer, loss: float = 0.0
) -> float | None:
    """Unscale, clip and step the master weights, then refresh the compute copy.

    Returns the gradient norm before clipping; None when fp16 loss scaling skipped the step
    because the gradients overflowed (normal, the scale adapts); NONFINITE when the loss or the
    gradient is NaN/inf otherwise: the step is skipped, weights and optimiser state untouched, and
    after `optim.max_nonfinite_steps` such steps in a row the run stops (UserError) before
    anything poisoned reaches a checkpoint.
    """
    scaler = setup.scaler
    scaler.unscale_(optimizer)
    clip = setup.config.optim.grad_clip if setup.config.optim.grad_clip > 0 else math.inf
    norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(setup.policy.model.parameters(), clip)))
    if not scaler.is_enabled() and not (math.isfinite(norm) and math.isfinite(loss)):
        optimizer.zero_grad(set_to_none=False)
        setup.nonfinite_streak += 1
        limit = setup.config.optim.max_nonfinite_steps
        if setup.nonfinite_streak >= limit:
            raise UserError(
                f"{limit} optimiser steps in a row had a non-finite loss or gradient (skipped, "
                "weights untouched); the run stops here, its last checkpoint is intact: lower "
                "optim.lr, clip gradients (optim.grad_clip) or check the rewards"
            )
        return NONFINITE
    setup.nonfinite_streak = 0
    scale = scaler.get_scale()
    scaler.step(optimizer)  # a no-op if the gradients overflowed
    scaler.update()
    if setup.compute_copy is not None:
        setup.compute_copy.refresh()
    return None if scaler.is_enabled() and scaler.get_scale() < scale else norm


def _likelihood_cosine(
    setup: Setup,
    batch: TokenBatch,
    weights: torch.Tensor,
    rows: torch.Tensor,
    normaliser_rows: torch.Tensor,
    cut: MicroBatching,
    backward: Callable[[torch.Tensor], None],
    normaliser: float | None = None,
) -> float:
    """cos(gradient now accumulated, gradient of the plain weighted likelihood, same weights).

    Both at the current parameters, over the same rows and normaliser: the update actually taken
    (ratio, clip, KL) against filtered SFT with its weights. Costs one extra backward; the
    accumulated gradient is put back untouched.
    """
    from rlino.analysis.gradients import compare_gradients

    master = setup.policy.model
    taken = [None if p.grad is None else p.grad.clone() for p in master.parameters()]
    actual = flat_grad(master)
    for p in master.parameters():
        p.grad = None
    plain = dataclasses.replace(setup.params, surrogate="likelihood", beta=0.0)
    accumulate_gradients(
        setup.compute_policy.model,
        batch,
        setup.method,
        plain,
        weights,
        rows,
        normaliser_rows,
        cut,
        backward=backward,
        normaliser=normaliser,
    )
    setup.world.sum_gradients(p for p in master.parameters() if p.requires_grad)
    cosine = compare_gradients(flat_grad(master), actual)["cosine"]
    for p, grad in zip(master.parameters(), taken, strict=True):
        p.grad = grad
    return cosine


def update(
    setup: Setup,
    batch: TokenBatch,
    weights: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    trainable: torch.Tensor | None = None,
    track_equivalence: bool = False,
) -> dict[str, Any]:
    """mu passes of minibatched, gradient-accumulated optimiser steps on one rollout batch.

    weights: (P, G) or (N,) per sample, or (N, Lc) per token. Samples whose weights are all 0
    (filtered groups) add nothing to the policy gradient, so they are not run through the model
    unless a KL term needs them; they still count in the loss's normaliser. `trainable` (N,) bool
    leaves samples out of the update altogether, normaliser included (overlong filtering).
    `track_equivalence`: at each optimiser step also compare the gradient taken with the plain
    weighted likelihood's (`equiv/...`).

    Returns the namespaced update metrics: `loss/...` (exact minibatch losses, mean over the
    optimiser steps), `optim/...` (lr-independent step statistics; clip fraction and ratio over
    every token run), and `equiv/...` when tracked.
    """
    cfg, params, method = setup.config, setup.params, setup.method
    model = setup.compute_policy.model  # runs every pass: the policy, or its compute-dtype copy
    device = setup.policy.device
    weights = weights.to(device)
    if weights.dim() == 2 and weights.shape != batch.mask.shape:
        weights = weights.reshape(-1)  # (P, G) -> (N,)
    n = len(batch)
    has_weight = weights != 0 if weights.dim() == 1 else (weights != 0).any(dim=1)  # (N,)
    keep = (
        torch.ones(n, dtype=torch.bool, device=device)
        if trainable is None
        else trainable.to(device)
    )
    needs_kl = setup.reference is not None
    clipped = (params.surrogate or method.surrogate) == "clipped"
    sizes = setup.world.all_gather(n)  # rows per rank; the whole batch is their sum
    offset, total = sum(sizes[: setup.world.rank]), sum(sizes)
    needs_old = clipped and (params.mu > 1 or cfg.optim.minibatch_size < total)
    cut = MicroBatching(cfg.optim.micro_batch_size, cfg.optim.micro_batch_tokens, cfg.optim.packing)

    model.eval()
    with fsdp.gathered(model):
        old_logp = frozen_logprobs(model, batch, cut) if needs_old else None
    ref_logp = frozen_logprobs(setup.reference.model, batch, cut) if needs_kl else None
    model.train()

    def backward(loss: torch.Tensor) -> None:
        setup.scaler.scale(loss).backward()
        if setup.compute_copy is not None:
            setup.compute_copy.accumulate_grads()

    world = setup.world
    master_params = [p for p in setup.policy.model.parameters() if p.requires_grad]
    for p in master_params:  # every step steps every parameter, a zero gradient where no row ran:
        if p.grad is None:  # the same in a fresh process (e.g. just resumed) as mid-run
            p.grad = torch.zeros_like(p)
    if setup.scaler.is_enabled():  # sets the loss scale up, for a step before any row has run
        setup.scaler.scale(torch.zeros((), device=device))
    sums: dict[str, float] = {}
    steps = skipped = nonfinite = 0
    grad_norms, offpolicy_clip = [], [0.0, 0.0]
    cosines: list[float | None] = []
    for _ in range(params.mu):
        for mb in _local_minibatches(offset, n, total, cfg.optim.minibatch_size, device):
            optimizer.zero_grad(set_to_none=False)
            kept = mb[keep[mb]]
            active = kept if needs_kl else kept[has_weight[kept]]
            local = {"n": normaliser_count(batch.mask[kept], params.aggregation)}
            count = world.sum_floats(local)["n"]  # the whole minibatch's, over every rank
            totals = accumulate_gradients(
                model,
                batch,
                method,
                params,
                weights,
                active,
                kept,
                cut,
                old_logp=old_logp,
                ref_logp=ref_logp,
                backward=backward,
                normaliser=count,
                world=world,
            )
            if not world.sharded:  # FSDP2 reduced them in accumulate_gradients' last pass
                world.sum_gradients(master_params)
            totals = world.sum_floats(totals)
            for key, value in totals.items():
                sums[key] = sums.get(key, 0.0) + value
            if steps and "clipped_tokens" in totals:
                offpolicy_clip[0] += totals["clipped_tokens"]
                offpolicy_clip[1] += totals["tokens"]
            if track_equivalence:  # one entry per step; None where no row carried weight
                cosines.append(
                    _likelihood_cosine(setup, batch, weights, active, kept, cut, backward, count)
                    if world.any(len(active) > 0)
                    else None
                )
            norm = optimizer_step(setup, optimizer, totals["loss/total"])
            if norm is None:
                skipped += 1
            elif norm == NONFINITE:
                nonfinite += 1
            else:
                grad_norms.append(norm)
            steps += 1
    out: dict[str, Any] = {
        **{key: sums[key] / steps for key in ("loss/policy", "loss/kl", "loss/total")},
        "optim/kl": sums["kl"] / steps,
        "optim/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
        "optim/steps": steps,
        "optim/nonfinite_steps": nonfinite,
        **{f"optim/{key}": value for key, value in token_means(sums).items()},
    }
    if setup.scaler.is_enabled():
        out["optim/skipped_steps"] = skipped  # overflowed fp16 gradients
        out["optim/loss_scale"] = setup.scaler.get_scale()
    if track_equivalence:
        out.update(equivalence_metrics(cosines, offpolicy_clip))
    return out


def _local_minibatches(
    offset: int, n: int, total: int, size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """This rank's rows of each minibatch of the whole batch, in order (possibly none).

    Minibatches of `size` are cut from the `total` rows in one-process order; this rank holds the
    `n` contiguous rows from `offset` on, so every rank takes the same optimiser steps on the
    same samples as one process would.
    """
    for start in range(0, total, size):
        lo, hi = max(start - offset, 0), min(start + size - offset, n)
        yield torch.arange(lo, max(lo, hi), device=device)


def equivalence_metrics(
    cosines: list[float | None], offpolicy_clip: list[float]
) -> dict[str, float | None]:
    """`equiv/...` of one update from its per-step cosines (None: a step with no weighted row)
    and the clipped / total tokens of the steps after the first."""
    out: dict[str, float | None] = {"equiv/cosine_onpolicy": cosines[0]}  # None: first filtered
    if len(cosines) > 1:
        later = [c for c in cosines[1:] if c is not None]
        out["equiv/cosine_offpolicy"] = sum(later) / len(later) if later else None
        clipped, tokens = offpolicy_clip
        out["equiv/clip_frac"] = clipped / tokens if tokens else None
    return out
