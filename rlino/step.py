"""One training iteration: sample -> verify -> weigh -> update, and the greedy evaluation.

`step(setup, iteration, optimizer)` is the body of the training loop and of the step benchmark,
so what is timed is what trains. Prompts are drawn in a seeded order that is a pure function of
the iteration number, and so are the sampling seeds, so a resumed run repeats the uninterrupted
one exactly (on CPU).

Under torchrun each rank samples, weighs and trains on its contiguous share of the iteration's
prompts (`rlino.distributed`); a prompt's sampling seed depends on its place in the whole
iteration, not on the rank, and the metrics are computed from the batch gathered back in
one-process order, so N ranks log what one process would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rlino.distributed import World
from rlino.evaluate import EvalReport, evaluate, summarize
from rlino.methods import ScoredBatch, weigh
from rlino.policy import Policy
from rlino.rollout import Rollouts, SamplingConfig, generate, prompt_seeds
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
    seed: int | Sequence[int],
    backend: str,
) -> Scored:
    """Draw `samples` completions for each example and verify them (seed: one, or one per example)."""
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
    """This rank's share of the iteration's P prompts x G samples from the compute policy, verified.

    Prompt j of the iteration samples with `prompt_seeds(sampling_seed, [j])` on whichever rank
    holds it (all P prompts in one process).
    """
    cfg = setup.config
    idx = prompt_order(len(setup.train_examples), cfg.seed, iteration, cfg.rollout.prompts_per_iter)
    lo, hi = setup.world.shard(len(idx))
    return sample_and_score(
        setup.compute_policy,
        setup.task,
        setup.template,
        [setup.train_examples[i] for i in idx[lo:hi]],
        cfg.rollout.samples_per_prompt,
        training_sampling(setup),
        seed=prompt_seeds(sampling_seed(cfg.seed, iteration), range(lo, hi)),
        backend=cfg.rollout.backend,
    )


def gather_scored(
    world: World, scored: Scored, weights: torch.Tensor, *, per_token: bool
) -> tuple[Scored, torch.Tensor]:
    """Every rank's share of the batch and its weights, concatenated in one-process order.

    Widths differ between ranks: prompts are left-padded and completions right-padded to the
    widest (padding cells hold token 0 under a False mask, log-prob 0, weight 0).
    """
    if not world.active:
        return scored, weights
    parts = world.all_gather((scored, weights.cpu()))
    shares = [p for p, _ in parts]
    r = [p.rollouts for p in shares]
    offsets = [0]
    for p in shares[:-1]:
        offsets.append(offsets[-1] + p.rewards.shape[0])
    rollouts = Rollouts(
        prompt_ids=_pad_cat([x.prompt_ids for x in r], left=True),
        prompt_mask=_pad_cat([x.prompt_mask for x in r], left=True),
        completion_ids=_pad_cat([x.completion_ids for x in r]),
        completion_mask=_pad_cat([x.completion_mask for x in r]),
        finished=torch.cat([x.finished for x in r]),
        prompt_index=torch.cat([x.prompt_index + o for x, o in zip(r, offsets, strict=True)]),
        logprobs=None if r[0].logprobs is None else _pad_cat([x.logprobs for x in r]),
        stop_strings=r[0].stop_strings,
    )
    gathered = Scored(
        rewards=torch.cat([p.rewards for p in shares]),
        correct=torch.cat([p.correct for p in shares]),
        completion_ids=rollouts.completion_ids,
        completion_mask=rollouts.completion_mask,
        rollouts=rollouts,
        texts=[t for p in shares for t in p.texts],
        examples=[e for p in shares for e in p.examples],
        format_ok=torch.cat([p.format_ok for p in shares]),
        lengths=torch.cat([p.lengths for p in shares]),
    )
    w = [p[1] for p in parts]
    return gathered, _pad_cat(w) if per_token else torch.cat(w)


def _pad_cat(tensors: list[torch.Tensor], *, left: bool = False) -> torch.Tensor:
    """Concatenate (n_i, w_i) tensors along rows, zero-padding columns to the widest."""
    width = max(t.shape[1] for t in tensors)
    pads = [(width - t.shape[1], 0) if left else (0, width - t.shape[1]) for t in tensors]
    return torch.cat(
        [torch.nn.functional.pad(t, pad) for t, pad in zip(tensors, pads, strict=True)]
    )


@dataclass
class ContinuationSampler:
    """A method's sampling handle: K fresh continuations of partial completions, verified.

    For Monte-Carlo values: the reward of continuing sample `row`'s prompt followed by a prefix of
    its completion, averaged over K draws, estimates the value of that prefix. A continuation gets
    what is left of the sample's token budget, max_new_tokens - len(prefix) (at least 1), so the
    value is that of the policy that drew the sample, length cap included; one cut at that cap is
    scored as `rollout.on_truncation` says (zero_reward: 0 and wrong; keep, mask: as written).
    Each (sample, prefix length) has its own seed, from the iteration's seed, the call count and
    the sample's index in the whole iteration, so resume, batching and (built-in backend) the
    number of ranks leave the draws unchanged. Built from a run's `setup` (the training step), or
    from the parts (`setup=None` with policy, task and sampling given: the analyses).
    """

    setup: Setup | None
    scored: Scored
    seed: int
    policy: Policy | None = field(default=None, kw_only=True)
    task: Task | None = field(default=None, kw_only=True)
    sampling: SamplingConfig | None = field(default=None, kw_only=True)
    """the rollouts' sampling settings; max_new_tokens is the whole completion's budget"""
    backend: str | None = field(default=None, kw_only=True)
    zero_truncated: bool | None = field(default=None, kw_only=True)
    """score a continuation cut at its budget 0 and wrong (on_truncation: zero_reward)"""
    row_offset: int | None = field(default=None, kw_only=True)
    """index in the whole iteration of this batch's first sample (a rank's share starts later)"""
    calls: int = field(default=0, init=False)
    sampled_tokens: int = field(default=0, init=False)
    """continuation tokens drawn within their budgets, over all calls"""
    seconds: float = field(default=0.0, init=False)
    """wall time spent sampling and scoring continuations, over all calls"""

    def __post_init__(self) -> None:
        if self.setup is not None:
            cfg, g = self.setup.config, self.scored.rewards.shape[1]
            self.policy = self.policy or self.setup.compute_policy
            self.task = self.task or self.setup.task
            self.sampling = self.sampling or training_sampling(self.setup)
            self.backend = self.backend or cfg.rollout.backend
            if self.zero_truncated is None:
                self.zero_truncated = cfg.rollout.on_truncation == "zero_reward"
            if self.row_offset is None:
                self.row_offset = self.setup.world.shard(cfg.rollout.prompts_per_iter)[0] * g
        self._parts()  # fail here, not at the first call

    def _parts(self) -> tuple[Policy, Task, SamplingConfig]:
        if self.policy is None or self.task is None or self.sampling is None:
            raise ValueError("ContinuationSampler needs a setup, or policy, task and sampling")
        return self.policy, self.task, self.sampling

    def continuation_rewards(
        self, rows: Sequence[int], prefixes: Sequence[Sequence[int]], k: int
    ) -> torch.Tensor:
        """(len(rows), k) rewards; sample `rows[i]`'s prompt + `prefixes[i]`, continued k times."""
        return self.continuation_scores(rows, prefixes, k)[0]

    def continuation_scores(
        self, rows: Sequence[int], prefixes: Sequence[Sequence[int]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(rows), k) rewards and (len(rows), k) correctness of k continuations of each prefix.

        One generate call for all prefixes (each prefix's prefill is shared by its k draws); it
        runs to the largest budget and each continuation is cut back to its own, which gives the
        same text as sampling with that budget. The text scored is prompt-free: prefix and
        continuation decoded together, so no token boundary is decoded twice.
        """
        from rlino.rollout import cut_after_stop

        policy, task, sampling = self._parts()
        start = time.perf_counter()
        r, g = self.scored.rollouts, self.scored.rewards.shape[1]
        heads = [list(prefix) for prefix in prefixes]
        if not heads:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.bool)
        cap = sampling.max_new_tokens
        budgets = [max(1, cap - len(head)) for head in heads]
        inputs = [
            r.prompt_ids[row][r.prompt_mask[row]].tolist() + head
            for row, head in zip(rows, heads, strict=True)
        ]
        offset = self.row_offset or 0
        states = [
            (offset + row) * (cap + 1) + len(head) for row, head in zip(rows, heads, strict=True)
        ]
        policy.model.eval()
        out = generate(
            policy,
            inputs,
            k,
            replace(sampling, max_new_tokens=max(budgets)),
            seed=prompt_seeds(self.seed + self.calls, states),
            backend=self.backend or "builtin",
        )
        self.calls += 1
        lengths = out.completion_mask.sum(dim=1).tolist()
        texts, truncated = [], []
        for n, i in enumerate(out.prompt_index.tolist()):
            kept = min(lengths[n], budgets[i])
            texts.append(heads[i] + out.completion_ids[n, :kept].tolist())
            truncated.append(lengths[n] > budgets[i] or not bool(out.finished[n]))
            self.sampled_tokens += kept
        decoded = policy.tokenizer.batch_decode(texts, skip_special_tokens=True)
        rewards, correct = [], []
        for text, i, cut in zip(decoded, out.prompt_index.tolist(), truncated, strict=True):
            score = task.score(
                cut_after_stop(text, sampling.stop_strings), self.scored.examples[rows[i] // g]
            )
            zero = cut and bool(self.zero_truncated)
            rewards.append(0.0 if zero else score.reward)
            correct.append(score.correct and not zero)
        self.seconds += time.perf_counter() - start
        shape = (len(heads), k)
        return torch.tensor(rewards).view(shape), torch.tensor(correct).view(shape)

    def step_ends(self, k: int) -> list[int]:
        """Token counts where the reasoning steps of sample `k`'s completion end (`rlino.vine`)."""
        from rlino.vine import completion_step_ends

        policy, task, _ = self._parts()
        return completion_step_ends(task, policy.tokenizer, self.scored.completion(k))


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
    with setup.whole_weights():  # a method's Monte-Carlo continuations sample too
        scored = rollout(setup, iteration)
        trainable = apply_truncation_rule(scored, cfg.rollout.on_truncation)
        t1 = time.perf_counter()
        continuation_seed = sampling_seed(cfg.seed, iteration) + CONTINUATION_SEED_OFFSET
        sampler = ContinuationSampler(setup, scored, continuation_seed)
        weights = weigh(setup.method, setup.params, scored, sampler)
    if trainable is not None:  # masked samples carry no weight
        keep = trainable.to(weights.dtype)  # (N,)
        weights = weights * (keep[:, None] if setup.method.per_token else keep.view(weights.shape))
    lr = float(optimizer.param_groups[0]["lr"])  # a tensor in torchao's optimisers
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
    scored, weights = gather_scored(setup.world, scored, weights, per_token=setup.method.per_token)
    tokens = int(scored.lengths.sum())
    metrics: dict[str, Any] = {
        **train_metrics(scored, weights),
        "train/sampled_tokens": tokens,
        **stats,
        "optim/lr": lr,
        "time/rollout_s": t1 - t0,
        "time/update_s": t2 - t1,
        "time/tokens_per_s": tokens / max(t2 - t0, 1e-9),
        "mem/peak_rss_gb": setup.world.max(round(peak_rss_gb() * 1e3)) / 1e3,  # largest rank's
    }
    if setup.world.any(sampler.calls > 0):
        metrics["train/mc_tokens"] = int(setup.world.sum_floats({"t": sampler.sampled_tokens})["t"])
        metrics["time/mc_s"] = sampler.seconds
    return StepResult(metrics, scored, weights)


def greedy_eval(setup: Setup) -> EvalReport:
    """Greedy pass@1 on the fixed test subset, with the compute policy; sharded across ranks."""
    world = setup.world
    setup.compute_policy.model.eval()
    lo, hi = world.shard(len(setup.eval_examples))
    with setup.whole_weights():
        report = _evaluate_shard(setup, lo, hi)
    if not world.active:
        return report
    shares = world.all_gather((lo, report.completions))
    completions = [replace(c, index=c.index + start) for start, part in shares for c in part]
    return summarize(completions, len(setup.eval_examples), samples=1)


def _evaluate_shard(setup: Setup, lo: int, hi: int) -> EvalReport:
    """Greedy evaluation of eval examples [lo, hi) (seeded by their place in the whole set)."""
    cfg = setup.config
    return evaluate(
        setup.compute_policy,
        setup.task,
        setup.eval_examples[lo:hi],
        template=setup.template,
        temperature=0.0,
        max_new_tokens=cfg.rollout.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        backend=cfg.rollout.backend,
        first_index=lo,
    )
