"""Sign-of-correctness weightings: NSR, PSR and W-REINFORCE (Zhu et al. 2025, arXiv 2506.01347).

"The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning" splits the REINFORCE
objective with rewards +1 / -1 into its two halves and trains on each alone:

- `nsr` (negative sample reinforcement): weight -1 on every wrong sample, 0 on correct ones;
- `psr` (positive sample reinforcement): +1 on every correct sample, 0 on wrong ones;
- `w-reinforce`: `method.positive_weight` (lambda, default 0.1, the paper's choice) on correct
  samples and -1 on wrong ones; `nsr` is its preset with lambda = 0.

The weights depend only on each sample's own binary success (`batch.correct`), never on its group
(no mean, no std, no filtering), so a group that is all wrong still pushes every sample down and
G = 1 works. Shaped rewards are ignored: on Countdown a well-formed but wrong answer (reward 0.1)
is wrong. The authors put these advantages into the PPO-clipped ratio loss (verl, no KL), so the
default surrogate here is `clipped`; `method.surrogate: likelihood` gives the plain weighted
log-likelihood (then `nsr` is F-ISFT-'s unfiltered, ungrouped cousin).

Registered on import; `rlino.methods` imports this module at its end, so every method name is
known wherever MethodParams is. torch is imported inside the weighting only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlino.methods import (
    Method,
    MethodParams,
    Sampler,
    ScoredBatch,
    correct_only,
    register_method,
    register_preset,
)

if TYPE_CHECKING:
    from torch import Tensor


def signed_correctness(
    batch: ScoredBatch, params: MethodParams, sampler: Sampler | None = None
) -> Tensor:
    """W-REINFORCE: +positive_weight on each correct sample, -1 on each wrong one, (P, G)."""
    right = batch.correct.to(batch.rewards.dtype)  # (P, G) 1 correct, 0 wrong
    return params.positive_weight * right - (1.0 - right)  # (P, G)


register_method(
    Method(
        "w-reinforce",
        "W-REINFORCE: +positive_weight on correct samples, -1 on wrong ones, clipped ratio",
        signed_correctness,
        surrogate="clipped",
        uses_kl=False,
        group_relative=False,
        knobs=("positive_weight",),
    )
)
register_method(
    Method(
        "psr",
        "PSR: +1 on correct samples, 0 on wrong ones, clipped ratio (RAFT's weights, clipped)",
        correct_only,
        surrogate="clipped",
        uses_kl=False,
        group_relative=False,
    )
)
register_preset(
    "nsr", "w-reinforce", "NSR: -1 on wrong samples, 0 on correct ones", positive_weight=0.0
)
