"""One training iteration: sample -> verify -> weigh -> update, and the greedy evaluation.

`step(setup, iteration, optimizer)` is the body of the training loop and of the step benchmark,
so what is timed is what trains. Prompts are drawn in a seeded order that is a pure function of
the iteration number, and so are the sampling seeds, so a resumed run repeats the uninterrupted
one exactly (on CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlino.evaluate import EvalReport, evaluate
from rlino.methods import ScoredBatch, weigh
from rlino.policy import Policy
from rlino.rollout import Rollouts, SamplingConfig, generate
from rlino.run_metrics import peak_rss_gb, train_metrics
from rlino.setup import Setup
from rlino.tasks import Example, Task, encode_prompts
from rlino.update import TokenBatch, update

PROMPT_ORDER_SEED_STRIDE = 7919
"""Epoch e of a run with seed s shuffles the prompts with seed s * stride + e (a prime, so the
(seed, epoch) pairs of ordinary runs never share a permutation)."""
SAMPLING_SEED_STRIDES = (1_000_003, 7_919, 17)
"""Sampling seed of (seed, iteration) = seed * a + iteration * b + c mod 2^31: distinct primes keep
the streams of different seeds and iterations apart."""
CONTINUATION_SEED_OFFSET = 104_729
"""Added to an iteration's sampling seed for Monte-Carlo continuations (a method's extra samples),
so they never reuse the draws of the iteration's own rollouts."""


def prompt_order(n_examples: int, seed: int, iteration: int, per_iter: int) -> list[int]:
    """Indices of the training prompts of `iteration`: a fresh seeded permutation each epoch."""
    out = []
    for k in range(iteration * per_iter, (iteration + 1) * per_iter):
        epoch, pos = divmod(k, n_examples)
        g = torch.Generator().manual_seed(seed * PROMPT_ORDER_SEED_STRIDE + epoch)
        out.append(int(torch.randperm(n_examples, generator=g)[pos]))
    return out


def sampling_seed(seed: int, iteration: int) -> int:
    """The sampling seed of an iteration: a pure function, so resume repeats the same draws."""
    a, b, c = SAMPLING_SEED_STRIDES
    return (seed * a + iteration * b + c) % (2**31)


@dataclass(kw_only=True)
class Scored(ScoredBatch):
    """A verified rollout batch: what a weighting sees, plus the rollouts and texts behind it."""

    rollouts: Rollouts
    texts: list[str]
    examples: list[Example]
    """the P prompts' examples, in group order"""
    format_ok: torch.Tensor  # (P, G) bool
    lengths: torch.Tensor  # (P, G) completion tokens


def sample_and_score(
    policy: Policy,
    task: Task,
    template: str,
    examples: list[Example],
    samples: int,
    sampling: SamplingConfig,
    *,
    seed: int,
    backend: str,
) -> Scored:
    """Draw `samples` completions for each example and verify them."""
    p, g = len(examples), samples
    policy.model.eval()
    prompt_ids = encode_prompts(policy.tokenizer, task, examples, template)
    rollouts = generate(policy, prompt_ids, g, sampling, seed=seed, backend=backend)
    texts = rollouts.texts(policy.tokenizer)
    scores = [
        task.score(text, examples[int(i)])
        for text, i in zip(texts, rollouts.prompt_index, strict=True)
    ]
    return Scored(
        rewards=torch.tensor([s.reward for s in scores], dtype=torch.float32).view(p, g),
        correct=torch.tensor([s.correct for s in scores]).view(p, g),
        completion_ids=rollouts.completion_ids,
        completion_mask=rollouts.completion_mask,
        rollouts=rollouts,
        texts=texts,
        examples=examples,
        format_ok=torch.tensor([s.format_ok for s in scores]).view(p, g),
        lengths=rollouts.completion_mask.sum(dim=1).view(p, g),
    )


def training_sampling(setup: Setup) -> SamplingConfig:
    """The sampling settings of training rollouts, from the run's config."""
    r = setup.config.rollout
    return SamplingConfig(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_strings=setup.task.stop_strings(setup.template),
        ignore_eos=r.ignore_eos,
    )


def rollout(setup: Setup, iteration: int) -> Scored:
    """This iteration's P prompts x G samples from the compute policy, verified."""
    cfg = setup.config
    idx = prompt_order(len(setup.train_examples), cfg.seed, iteration, cfg.rollout.prompts_per_iter)
    return sample_and_score(
        setup.compute_policy,
        setup.task,
        setup.template,
        [setup.train_examples[i] for i in idx],
        cfg.rollout.samples_per_prompt,
        training_sampling(setup),
        seed=sampling_seed(cfg.seed, iteration),
        backend=cfg.rollout.backend,
    )


@dataclass
class ContinuationSampler:
    """A method's sampling handle: K fresh continuations of partial completions, verified.

    For Monte-Carlo values: the reward of continuing sample `row`'s prompt followed by a prefix of
    its completion, averaged over K draws, estimates the value of that prefix. Seeded from the
    iteration, so resume repeats it.
    """

    setup: Setup
    scored: Scored
    seed: int
    calls: int = field(default=0, init=False)
    sampled_tokens: int = field(default=0, init=False)

    def continuation_rewards(
        self, rows: Sequence[int], prefixes: Sequence[Sequence[int]], k: int
    ) -> torch.Tensor:
        """(len(rows), k) rewards; sample `rows[i]`'s prompt + `prefixes[i]`, continued k times."""
        r, policy, task = self.scored.rollouts, self.setup.compute_policy, self.setup.task
        g = self.scored.rewards.shape[1]
        prompts = [r.prompt_ids[row][r.prompt_mask[row]].tolist() for row in rows]
        inputs = [p + list(prefix) for p, prefix in zip(prompts, prefixes, strict=True)]
        sampling = training_sampling(self.setup)
        policy.model.eval()
        out = generate(
            policy,
            inputs,
            k,
            sampling,
            seed=self.seed + self.calls,
            backend=self.setup.config.rollout.backend,
        )
        self.calls += 1
        self.sampled_tokens += int(out.completion_mask.sum())
        heads = policy.tokenizer.batch_decode([list(p) for p in prefixes], skip_special_tokens=True)
        texts = out.texts(policy.tokenizer)
        rewards = [
            task.score(heads[int(i)] + text, self.scored.examples[rows[int(i)] // g]).reward
            for text, i in zip(texts, out.prompt_index, strict=True)
        ]
        return torch.tensor(rewards, dtype=torch.float32).view(len(rows), k)


@dataclass
class StepResult:
    """What one iteration produced: its metrics row and the batch behind it."""

    metrics: dict[str, Any]
    scored: Scored
    weights: torch.Tensor
    """(P, G) per sample, or (N, Lc) per token"""


def apply_truncation_rule(scored: Scored, rule: str) -> torch.Tensor | None:
    """`rollout.on_truncation` on a scored batch; returns the trainable rows (N,) for `mask`.

    keep: truncated samples are scored like any other. zero_reward: a truncated sample gets reward
    0 and counts as wrong (a ramble cut at the cap is no answer, whatever its last number).
    mask: DAPO's overlong filtering, no gradient from truncated samples (they stay in the metrics).
    """
    truncated = ~scored.rollouts.finished  # (N,)
    if rule == "zero_reward":
        cut = truncated.view(scored.rewards.shape)  # (P, G)
        scored.rewards = scored.rewards.masked_fill(cut, 0.0)
        scored.correct = scored.correct & ~cut
    return ~truncated if rule == "mask" else None


def step(setup: Setup, iteration: int, optimizer: torch.optim.Optimizer) -> StepResult:
    """One iteration: sample and verify, weigh, update; the lr is the optimiser's current one."""
    cfg = setup.config
    t0 = time.perf_counter()
    scored = rollout(setup, iteration)
    trainable = apply_truncation_rule(scored, cfg.rollout.on_truncation)
    t1 = time.perf_counter()
    continuation_seed = sampling_seed(cfg.seed, iteration) + CONTINUATION_SEED_OFFSET
    sampler = ContinuationSampler(setup, scored, continuation_seed)
    weights = weigh(setup.method, setup.params, scored, sampler)
    if trainable is not None:  # masked samples carry no weight
        keep = trainable.to(weights.dtype)  # (N,)
        weights = weights * (keep[:, None] if setup.method.per_token else keep.view(weights.shape))
    lr = optimizer.param_groups[0]["lr"]
    batch = TokenBatch.from_rollouts(scored.rollouts, setup.policy.device, cfg.rollout.temperature)
    every = cfg.analysis.equivalence_every
    stats = update(
        setup,
        batch,
        weights,
        optimizer,
        trainable=trainable,
        track_equivalence=bool(every) and iteration % every == 0,
    )
    t2 = time.perf_counter()
    tokens = int(scored.lengths.sum())
    metrics: dict[str, Any] = {
        **train_metrics(scored, weights),
        "train/sampled_tokens": tokens,
        **stats,
        "optim/lr": lr,
        "time/rollout_s": t1 - t0,
        "time/update_s": t2 - t1,
        "time/tokens_per_s": tokens / max(t2 - t0, 1e-9),
        "mem/peak_rss_gb": peak_rss_gb(),
    }
    if sampler.calls:
        metrics["train/mc_tokens"] = sampler.sampled_tokens
    return StepResult(metrics, scored, weights)


def greedy_eval(setup: Setup) -> EvalReport:
    """Greedy pass@1 on the fixed test subset, with the compute policy."""
    cfg = setup.config
    setup.compute_policy.model.eval()
    return evaluate(
        setup.compute_policy,
        setup.task,
        setup.eval_examples,
        template=setup.template,
        temperature=0.0,
        max_new_tokens=cfg.rollout.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        backend=cfg.rollout.backend,
    )
