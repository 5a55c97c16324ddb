"""What a training run logs: per-iteration batch statistics, evaluation numbers, sample rows.

Pure functions from a scored batch (or an evaluation report) to namespaced, JSON-ready values,
so the loop only collects and writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlino.losses import per_sample_weights
from rlino.methods import filtered_groups

if TYPE_CHECKING:
    from rlino.evaluate import EvalReport
    from rlino.step import Scored
    from rlino.tasks import Task


METRIC_KEYS: dict[str, str] = {
    "iteration": "iterations done (0: the evaluation before training)",
    "train/reward_mean": "mean reward of the rollout batch",
    "train/accuracy": "fraction of rollout samples that are correct",
    "train/format_rate": "fraction of rollout samples in the task's answer format",
    "train/groups_filtered": "fraction of groups whose rewards are all equal (weight 0)",
    "train/length_mean": "mean completion length, tokens",
    "train/length_correct": "mean length of correct samples (absent when none)",
    "train/length_wrong": "mean length of wrong samples (absent when none)",
    "train/weight_sum_mean": "mean over groups of the sum of the group's weights (GRPO: 0)",
    "train/weight_sum_min": "the most negative group weight sum",
    "train/truncated": "fraction of samples cut at max_new_tokens",
    "train/entropy": "-mean log-prob of the sampled tokens under the sampling policy",
    "train/sampled_tokens": "completion tokens sampled this iteration",
    "train/mc_tokens": "extra tokens a method sampled for Monte-Carlo values (when it did)",
    "loss/policy": "the surrogate's loss on a minibatch (exact), mean over optimiser steps",
    "loss/kl": "beta x the k3 KL term of that loss",
    "loss/total": "loss/policy + loss/kl",
    "optim/lr": "learning rate of this iteration",
    "optim/grad_norm": "gradient norm before clipping, mean over optimiser steps",
    "optim/steps": "optimiser steps this iteration (mu x minibatches)",
    "optim/kl": "k3 KL estimate to the reference (0 without one), mean over steps",
    "optim/clip_frac": "clipped surrogate: fraction of the tokens run whose ratio was clipped",
    "optim/ratio_mean": "clipped surrogate: mean ratio pi / pi_old over the tokens run",
    "optim/nonfinite_steps": "optimiser steps skipped for a NaN/inf loss or gradient",
    "optim/skipped_steps": "fp16: optimiser steps skipped for overflowing gradients",
    "optim/loss_scale": "fp16: the loss scale after this iteration",
    "equiv/cosine_onpolicy": "cos(gradient taken, weighted-likelihood gradient), first step",
    "equiv/cosine_offpolicy": "the same, mean over the later steps (absent with one step)",
    "equiv/clip_frac": "clipped-token fraction over those later steps",
    "time/rollout_s": "seconds sampling and scoring",
    "time/update_s": "seconds weighing and updating",
    "time/mc_s": "of those, seconds sampling and scoring Monte-Carlo continuations (when any)",
    "time/tokens_per_s": "sampled tokens / (rollout + update) seconds",
    "mem/peak_rss_gb": "the process's peak resident memory so far, GB (the largest rank's)",
    "eval/accuracy": "greedy pass@1 on the fixed test subset",
    "eval/reward_mean": "mean reward of those greedy completions",
    "eval/length_mean": "their mean length",
    "eval/length_correct": "mean length of the correct ones",
    "eval/length_wrong": "mean length of the wrong ones",
    "eval/format_rate": "fraction in the answer format",
    "eval/truncated_rate": "fraction cut at max_new_tokens",
}
"""Every key metrics.jsonl can hold, with one line each (the README's table is made from this)."""


def peak_rss_gb() -> float:
    """This process's peak resident set size (VmHWM) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    import resource  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


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
        "train/entropy": entropy,
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
        "eval/truncated_rate": report.truncated_rate,
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
