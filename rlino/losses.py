"""Losses as pure tensor functions: weighted log-likelihood, GRPO's clipped surrogate, k3 KL.

Shapes: N samples (N = P prompts x G samples), T completion tokens (padded); `logp` (N, T) holds
each completion token's log-probability under the policy, `mask` (N, T) is 1 on real tokens. Values
at masked positions are ignored but must be finite. Weights are one per sample, (N,), or one per
token, (N, T) (a per-token method such as Monte-Carlo step credit); both broadcast the same way.

How per-token losses become a scalar is a choice of its own (`aggregate`): the paper's length
argument rests on GRPO's per-sample 1/|o| (seq-mean), while the authors' code averaged over all
tokens (token-mean), so rlino makes it an option to separate the two causes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rlino.methods import Method, MethodParams

Stats = dict[str, float]


def aggregate(
    per_token: Tensor, mask: Tensor, mode: str, constant_length: int | None = None
) -> Tensor:
    """Reduce a per-token loss (N, T) to a scalar.

    seq-mean: each sample's masked sum / its own length, then the mean over samples (DeepSeekMath);
    token-mean: sum over all masked tokens / their count (DAPO; what the paper's code did);
    constant: sum / (N * constant_length) (Dr. GRPO): every token weighs the same, short or long.
    """
    m = mask.to(per_token.dtype)  # (N, T)
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))  # (N, T)
    if mode == "seq-mean":
        lengths = m.sum(dim=1).clamp(min=1.0)  # (N,)
        return (masked.sum(dim=1) / lengths).mean()
    if mode == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if mode == "constant":
        if constant_length is None or constant_length < 1:
            raise ValueError(
                f"aggregation 'constant' needs constant_length >= 1, got {constant_length}"
            )
        return masked.sum() / (per_token.shape[0] * constant_length)
    raise ValueError(f"unknown aggregation {mode!r}")


def normaliser_count(minibatch_mask: Tensor, mode: str) -> float:
    """What a minibatch's loss is divided by: its token count for token-mean, else its samples.

    Counts add up over data-parallel ranks; `micro_batch_share` keeps a token count of 0 at 1."""
    if mode == "token-mean":
        return float(minibatch_mask.sum())
    return float(minibatch_mask.shape[0])


def micro_batch_share(micro_mask: Tensor, minibatch_count: float, mode: str) -> float:
    """The factor that makes a micro-batch's aggregated loss its exact share of the minibatch's.

    `aggregate` normalises by the micro-batch's own count (samples, or tokens for token-mean);
    scaling by micro count / minibatch count (`normaliser_count`) makes gradient accumulation over
    micro-batches equal to one pass over the whole minibatch. The minibatch count includes samples
    that were skipped because their weight is 0, which keeps the normaliser of the naive
    computation, and under data parallelism it is the count over every rank's share.
    """
    if mode == "token-mean":
        return float(micro_mask.sum()) / max(minibatch_count, 1.0)
    return micro_mask.shape[0] / minibatch_count


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` (N, T) over the real tokens of `mask`."""
    return aggregate(values, mask, "token-mean")


def per_token_weights(weights: Tensor) -> Tensor:
    """Weights as (N, 1) (one per sample, broadcast over tokens) or (N, T) (one per token)."""
    return weights[:, None] if weights.dim() == 1 else weights


def per_sample_weights(weights: Tensor, mask: Tensor) -> Tensor:
    """(N,) one weight per sample: as given, or a per-token weight's mean over the real tokens."""
    if weights.dim() == 1:
        return weights
    m = mask.to(weights.dtype)  # (N, T)
    return (weights * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (N,)


def weighted_likelihood_loss(
    logp: Tensor,
    weights: Tensor,
    mask: Tensor,
    mode: str = "seq-mean",
    constant_length: int | None = None,
) -> Tensor:
    """Filtered-SFT loss: -w_it * log pi(o_it), aggregated; weights (N,) or (N, T)."""
    per_token = -per_token_weights(weights) * logp  # (N, T)
    return aggregate(per_token, mask, mode, constant_length)


def clipped_surrogate_loss(
    logp: Tensor,
    old_logp: Tensor,
    weights: Tensor,
    mask: Tensor,
    eps: float,
    mode: str = "seq-mean",
    constant_length: int | None = None,
) -> tuple[Tensor, Stats]:
    """GRPO/PPO surrogate: per token -min(r A, clip(r, 1-eps, 1+eps) A), r = pi / pi_old.

    A is the weight (GRPO's advantage), (N,) or (N, T).

    Stats: clip_frac, the fraction of real tokens where the clipped branch is the smaller one (its
    gradient is zero there), and ratio_mean over real tokens.
    """
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = per_token_weights(weights)  # (N, 1) or (N, T)
    unclipped = ratio * adv  # (N, T)
    clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * adv  # (N, T)
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, mode, constant_length)
    with torch.no_grad():
        active = (clipped < unclipped).to(logp.dtype)  # (N, T)
        stats = {
            "clip_frac": masked_mean(active, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref) on samples from pi: exp(d) - d - 1, d = ref - logp.

    Non-negative, zero where logp == ref_logp; minimising it pulls logp toward ref_logp.
    """
    d = ref_logp - logp  # (N, T)
    return torch.exp(d) - d - 1.0


# ---- dispatch on Method.surrogate: the one place a method's loss shape is chosen -------------

SurrogateFn = Callable[
    ["MethodParams", Tensor, Tensor, Tensor, "Tensor | None"], tuple[Tensor, Stats]
]


def _likelihood(
    params: MethodParams, logp: Tensor, mask: Tensor, weights: Tensor, old_logp: Tensor | None
) -> tuple[Tensor, Stats]:
    loss = weighted_likelihood_loss(logp, weights, mask, params.aggregation, params.constant_length)
    return loss, {}


def _clipped(
    params: MethodParams, logp: Tensor, mask: Tensor, weights: Tensor, old_logp: Tensor | None
) -> tuple[Tensor, Stats]:
    old = logp.detach() if old_logp is None else old_logp
    return clipped_surrogate_loss(
        logp, old, weights, mask, params.clip_eps, params.aggregation, params.constant_length
    )


SURROGATE_LOSSES: dict[str, SurrogateFn] = {"likelihood": _likelihood, "clipped": _clipped}


def policy_loss(
    method: Method,
    params: MethodParams,
    logp: Tensor,
    mask: Tensor,
    weights: Tensor,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> tuple[Tensor, Stats]:
    """The loss a method minimises on one batch, and float stats for logging.

    weights: (N,), (P, G) with P * G = N, or per token (N, T), from `rlino.methods.weigh`.
    old_logp: the policy's log-probs at sampling time (None = on-policy, ratio 1). ref_logp: the
    frozen reference's; the k3 KL is logged whenever given and added as + beta * KL when
    params.beta > 0. Stats: loss/policy, loss/kl, loss/total, kl, weight_sum, weight_abs_sum, and
    for the clipped surrogate clip_frac and ratio_mean.
    """
    if weights.shape != logp.shape:
        weights = weights.reshape(-1)  # (P, G) -> (N,)
    w = weights.to(logp.dtype)  # (N,) or (N, T)
    if w.shape[0] != logp.shape[0]:
        raise ValueError(f"{w.shape[0]} weights for {logp.shape[0]} samples")
    if params.beta > 0 and not method.uses_kl:
        raise ValueError(f"method {method.name!r} has no KL term but beta={params.beta}")
    if params.beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
    surrogate = params.surrogate or method.surrogate
    pg_loss, stats = SURROGATE_LOSSES[surrogate](params, logp, mask, w, old_logp)
    loss = pg_loss
    kl_value = 0.0
    kl_term = 0.0
    if ref_logp is not None:
        kl = aggregate(kl_k3(logp, ref_logp), mask, params.aggregation, params.constant_length)
        kl_value = kl.item()
        if params.beta > 0:
            loss = loss + params.beta * kl
            kl_term = params.beta * kl_value
    w = per_sample_weights(w, mask)  # (N,)
    stats = {
        "loss/policy": pg_loss.item(),
        "loss/kl": kl_term,
        "loss/total": loss.item(),
        "kl": kl_value,
        "weight_sum": w.sum().item(),
        "weight_abs_sum": w.abs().sum().item(),
        **stats,
    }
    return loss, stats
