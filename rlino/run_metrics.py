"""What a training run logs: per-iteration batch statistics, evaluation numbers, sample rows.

Pure functions from a scored batch (or an evaluation report) to namespaced, JSON-ready values,
so the loop only collects and writes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlino.losses import per_sample_weights
from rlino.methods import filtered_groups

if TYPE_CHECKING:
    from rlino.evaluate import EvalReport
    from rlino.step import Scored
    from rlino.tasks import Task


def _mean_where(values: torch.Tensor, where: torch.Tensor) -> float | None:
    return float(values[where].float().mean()) if bool(where.any()) else None


def sample_weights(scored: Scored, weights: torch.Tensor) -> torch.Tensor:
    """(P, G) one weight per sample; a per-token method's weights averaged over each sample."""
    p, g = scored.rewards.shape
    if weights.shape == scored.rewards.shape:
        return weights
    mask = scored.rollouts.completion_mask.to(weights.device)
    return per_sample_weights(weights.reshape(p * g, -1), mask).view(p, g)


def train_metrics(scored: Scored, weights: torch.Tensor) -> dict[str, Any]:
    """Per-iteration statistics of the rollout batch: rewards, filtering, lengths, weight balance."""
    c, lengths = scored.correct, scored.lengths
    sums = sample_weights(scored, weights).sum(dim=1)  # (P,) GRPO's sum to 0, F-ISFT+-'s need not
    r = scored.rollouts
    entropy = None  # Monte-Carlo estimate: -mean log-prob of the sampled tokens (sampling policy)
    if r.logprobs is not None:
        entropy = float(
            -(r.logprobs * r.completion_mask).sum() / r.completion_mask.sum().clamp(min=1)
        )
    return {
        "train/reward_mean": float(scored.rewards.mean()),
        "train/accuracy": float(c.float().mean()),
        "train/format_rate": float(scored.format_ok.float().mean()),
        "train/groups_filtered": float(filtered_groups(scored.rewards).float().mean()),
        "train/length_mean": float(lengths.float().mean()),
        "train/length_correct": _mean_where(lengths, c),
        "train/length_wrong": _mean_where(lengths, ~c),
        "train/weight_sum_mean": float(sums.mean()),
        "train/weight_sum_min": float(sums.min()),
        "train/truncated": float((~r.finished).float().mean()),
        "entropy": entropy,
    }


def eval_metrics(report: EvalReport) -> dict[str, Any]:
    """The namespaced numbers of a periodic evaluation."""
    return {
        "eval/accuracy": report.accuracy,
        "eval/reward_mean": report.reward_mean,
        "eval/length_mean": report.mean_length,
        "eval/length_correct": report.mean_length_correct,
        "eval/length_wrong": report.mean_length_wrong,
        "eval/format_rate": report.format_rate,
    }


def sample_rows(
    iteration: int, scored: Scored, weights: torch.Tensor, task: Task, groups: int = 2
) -> list[dict[str, Any]]:
    """A few completions (the first `groups` groups) for samples.jsonl."""
    p, g = scored.rewards.shape
    per_sample = sample_weights(scored, weights)
    rows = []
    for i in range(min(groups, p)):
        for j in range(g):
            k = i * g + j
            rows.append(
                {
                    "iteration": iteration,
                    "prompt": task.question(scored.examples[i]),
                    "response": scored.texts[k],
                    "reward": float(scored.rewards[i, j]),
                    "correct": bool(scored.correct[i, j]),
                    "weight": float(per_sample[i, j]),
                    "length": int(scored.lengths[i, j]),
                }
            )
    return rows
