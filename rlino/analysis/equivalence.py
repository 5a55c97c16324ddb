"""`rlino analyze equivalence`: GRPO's gradient is filtered iterative SFT's, measured on a real batch.

One batch of real rollouts (P prompts x G samples at temperature 1) is drawn from the policy and
verified; then the full-parameter gradient (all parameters, flattened) of several losses is taken
on exactly that batch and compared with GRPO's on-policy gradient (beta 0, one step, seq-mean):

- `fisft-grpo`: plain weighted log-likelihood with GRPO's standardised weights. At ratio 1 the
  clipped surrogate's gradient is A * grad log pi, so the two agree to float precision: the
  paper's claim, as a number (cosine 1).
- `fisft+-`, `fisft+`: the paper's F-ISFT weights (+-0.5 and +1/0): same samples, other weights.
- `grpo token-mean` / `grpo constant`: same weights, other aggregation (no per-sample 1/|o|);
  differs from seq-mean as much as the batch's lengths differ.
- `grpo + kl` (reference = the policy): the situation at the first step of a run with a KL term: the
  reference is the policy itself and the k3 KL's gradient, 1 - pi_ref/pi per token, is exactly 0.
- `grpo k steps`: k small AdamW steps (default 3 at lr 1e-5) with the GRPO loss, then the
  gradient there with the old log-probs from the start, so the ratio has left 1 and clipping acts
  (clip fraction shown). The gradient turns fast: it sits on a few low-probability tokens, the
  ones whose ratios move, and clip, first.
- `grpo k steps + kl`: the same point with the KL to the starting policy added: the KL
  term's real effect once the policy has moved (compared with the row above as well).
- `vine`: Monte-Carlo step credit (`rlino.vine`, K continuations from every step boundary of the
  same batch): what leaving the degenerate MDP changes in the gradient, against GRPO's, and
  `vine vs fisft+-` the same gradient against F-ISFT+-'s (that row's cosine is not GRPO's);
  `vine, new draws` takes it again with fresh continuations, against the first: the part of
  vine's difference from the others that is only Monte-Carlo noise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rlino.analysis.gradients import compare_gradients, flat_gradient, loss_backward
from rlino.errors import UserError
from rlino.methods import MethodParams, filtered_groups

if TYPE_CHECKING:
    import torch

    from rlino.policy import Policy
    from rlino.step import ContinuationSampler, Scored
    from rlino.tasks import Task
    from rlino.update import TokenBatch

PROMPT_SEED_STRIDE = 1009
"""Attempt a of seed s draws its prompts with seed s * stride + a (redraws never repeat a set)."""
SAMPLING_SEED_STRIDE = 7919
"""... and samples them with seed s * stride + a."""


@dataclass
class Batch:
    """One verified rollout batch (temperature 1) and its token layout for the gradients."""

    scored: Scored
    tokens: TokenBatch
    attempt: int
    """how many all-filtered batches were redrawn before this one"""


def draw_batch(
    policy: Policy,
    task: Task,
    template: str,
    *,
    prompts: int,
    samples: int,
    seed: int,
    max_new_tokens: int,
    backend: str = "builtin",
    max_attempts: int = 5,
) -> Batch:
    """Sample P x G completions at temperature 1 on seeded training prompts and score them.

    Sampling and scoring are the training loop's own (`rlino.step.sample_and_score`). A batch
    where every group is filtered carries no gradient for any group-relative method; it is redrawn
    (new prompts, new seed) up to `max_attempts` times, then UserError.
    """
    import torch

    from rlino.rollout import SamplingConfig
    from rlino.step import sample_and_score
    from rlino.update import TokenBatch

    pool = task.examples("train")
    if len(pool) < prompts:
        raise UserError(
            f"task {task.name!r} has {len(pool)} training examples, fewer than {prompts}"
        )
    sampling = SamplingConfig(
        temperature=1.0, max_new_tokens=max_new_tokens, stop_strings=task.stop_strings(template)
    )
    for attempt in range(max_attempts):
        g = torch.Generator().manual_seed(seed * PROMPT_SEED_STRIDE + attempt)
        examples = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:prompts]]
        scored = sample_and_score(
            policy,
            task,
            template,
            examples,
            samples,
            sampling,
            seed=seed * SAMPLING_SEED_STRIDE + attempt,
            backend=backend,
        )
        if not bool(filtered_groups(scored.rewards).all()):
            return Batch(scored, TokenBatch.from_rollouts(scored.rollouts, policy.device), attempt)
    raise UserError(
        f"no learning signal: in {max_attempts} batches of {prompts} prompts x {samples} samples "
        "every group's samples got the same reward (all groups filtered); use more --prompts or "
        "--samples, or a model that solves the task sometimes"
    )


# ---------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: a loss, where its gradient is taken, and which log-probs it sees."""

    label: str
    key: str
    """short key in the JSON: `grpo_vs_<key>_cosine`, `grpo_vs_<key>_rel_diff`"""
    what: str
    """the setting, for the table ({alpha}, {beta}, {steps}, {lr} filled in)"""
    params: MethodParams
    moved: bool = False
    """taken after the k inner GRPO steps (off-policy), with the starting log-probs as old"""
    kl: bool = False
    """with the KL term to the starting policy (beta from the command)"""
    against: str = "grpo"
    """the row whose gradient this one is compared with: grpo, or another row's key"""
    redraw: bool = False
    """a sampling method's loss again with fresh Monte-Carlo draws (not the cached gradient)"""

    @property
    def flat(self) -> str:
        """Prefix of the row's numbers in the JSON: `grpo_vs_<key>`, or `<key>` when its
        comparison is named in the key itself (e.g. `vine_vs_fisft_pm`)."""
        return f"grpo_vs_{self.key}" if self.against == "grpo" else self.key


def variants(alpha: float, clip_eps: float, mc_samples: int = 4) -> list[Variant]:
    """The rows after the GRPO reference row, in table order (no vine rows for mc_samples 0)."""
    grpo = MethodParams(name="grpo", beta=0.0, clip_eps=clip_eps)
    rows = [
        Variant(
            "fisft-grpo", "fisft", "likelihood, weights A+/A-", MethodParams(name="fisft-grpo")
        ),
        Variant(
            "fisft+-",
            "fisft_pm",
            "likelihood, +{plus:g}/-{alpha:g}",
            MethodParams(name="fisft", alpha=alpha),
        ),
        Variant("fisft+", "fisft_plus", "likelihood, +1/0", MethodParams(name="fisft+")),
        Variant(
            "grpo token-mean",
            "token_mean",
            "mean over the batch's tokens",
            replace(grpo, aggregation="token-mean"),
        ),
        Variant(
            "grpo constant",
            "constant",
            "sum / (N x max length)",
            replace(grpo, aggregation="constant"),
        ),
        Variant("grpo + kl", "kl_start", "beta {beta:g}, reference = policy", grpo, kl=True),
        Variant("grpo k steps", "k_steps", "{steps} AdamW steps, lr {lr:g}", grpo, moved=True),
        Variant(
            "grpo k steps + kl",
            "k_steps_kl",
            "same, + beta {beta:g} KL to start",
            grpo,
            moved=True,
            kl=True,
        ),
    ]
    if not mc_samples:
        return rows
    vine = MethodParams(name="vine", beta=0.0, clip_eps=clip_eps, mc_samples=mc_samples)
    return [
        *rows,
        Variant("vine", "vine", "MC step values, K = {mc_samples} per boundary", vine),
        Variant(
            "vine vs fisft+-",
            "vine_vs_fisft_pm",
            "vine's gradient; cosine vs fisft+-, not grpo",
            vine,
            against="fisft_pm",
        ),
        Variant(
            "vine, new draws",
            "vine_vs_vine_redraw",
            "fresh MC continuations; cosine vs vine",
            vine,
            against="vine",
            redraw=True,
        ),
    ]


ROW_KEYS = {v.label: v.key for v in variants(0.5, 0.2)}
"""Row label -> short key; the JSON holds `<flat>_cosine` and `<flat>_rel_diff` (`Variant.flat`)."""


def _moved_copy(
    model: torch.nn.Module,
    batch: Batch,
    params: MethodParams,
    base_logp: torch.Tensor,
    *,
    steps: int,
    lr: float,
    micro: int,
) -> torch.nn.Module:
    """A copy of `model` after `steps` AdamW steps on the GRPO loss (old log-probs fixed)."""
    import torch

    moved = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(
        [p for p in moved.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_backward(moved, batch.scored, batch.tokens, params, micro=micro, old_logp=base_logp)
        optimizer.step()
    return moved


def _batch_facts(batch: Batch) -> dict[str, Any]:
    scored = batch.scored
    lengths, correct = scored.lengths.float(), scored.correct
    return {
        "groups_informative": int((~filtered_groups(scored.rewards)).sum()),
        "accuracy": float(correct.float().mean()),
        "reward_mean": float(scored.rewards.mean()),
        "length_mean": float(lengths.mean()),
        "length_std": float(lengths.std(correction=0)),
        "length_correct": float(lengths[correct].mean()) if bool(correct.any()) else None,
        "length_wrong": float(lengths[~correct].mean()) if bool((~correct).any()) else None,
    }


def gradient_equivalence(
    policy: Policy,
    task: Task,
    *,
    template: str | None = None,
    prompts: int = 8,
    samples: int = 8,
    seed: int = 0,
    max_new_tokens: int = 128,
    inner_steps: int = 3,
    inner_lr: float = 1e-5,
    beta: float = 0.04,
    clip_eps: float = 0.2,
    alpha: float = 0.5,
    micro_batch_size: int = 64,
    backend: str = "builtin",
    mc_samples: int = 4,
) -> dict[str, Any]:
    """Gradients of GRPO and its F-ISFT relatives on one real batch, compared with GRPO's.

    Returns a JSON-ready dict: `rows` (label, what, cosine, rel_diff, norm, clip_frac, kl), the
    flat `grpo_vs_<key>_cosine` / `_rel_diff` numbers (key in ROW_KEYS; `grpo_vs_fisft_cosine` is
    GRPO vs fisft-grpo; `vine_vs_fisft_pm_cosine` compares vine with F-ISFT+-,
    `vine_vs_vine_redraw_cosine` two Monte-Carlo draws of vine's),
    `kl_effect_cosine` (k steps with vs without KL), `mc_tokens` (the continuation tokens the vine
    rows sampled, `mc_samples` per step boundary; 0 leaves the vine rows out, as `rlino demo`
    does to stay fast) and batch facts. The policy's weights are left
    unchanged (the k-step model is a copy). Deterministic for a seed.
    """
    import torch

    if prompts < 1 or samples < 2:
        raise UserError("need at least 1 prompt and 2 samples per prompt (groups compare samples)")
    if inner_steps < 1:
        raise UserError(f"inner steps must be >= 1 (got {inner_steps})")
    if beta <= 0:
        raise UserError(f"beta must be > 0 for the KL rows (got {beta})")
    if mc_samples < 0:
        raise UserError(f"mc_samples must be >= 0 (got {mc_samples}; 0 = no vine rows)")

    template = template or task.default_template
    torch.manual_seed(seed)
    batch = draw_batch(
        policy,
        task,
        template,
        prompts=prompts,
        samples=samples,
        seed=seed,
        max_new_tokens=max_new_tokens,
        backend=backend,
    )
    policy.model.eval()  # no dropout: the gradients must be deterministic functions of the weights
    fill = {
        "alpha": alpha,
        "plus": 1 - alpha,
        "beta": beta,
        "steps": inner_steps,
        "lr": inner_lr,
        "mc_samples": mc_samples,
    }
    grpo = MethodParams(name="grpo", beta=0.0, clip_eps=clip_eps)
    sampler = _continuation_sampler(
        policy, task, template, batch, seed=seed, max_new_tokens=max_new_tokens, backend=backend
    )
    table = variants(alpha, clip_eps, mc_samples)
    m = _measure(policy.model, batch, grpo, table, fill, micro_batch_size, sampler)
    result: dict[str, Any] = {
        "model": policy.source,
        "task": task.name,
        "template": template,
        "prompts": prompts,
        "samples": samples,
        "seed": seed,
        "redrawn_batches": batch.attempt,
        "num_parameters": m.num_parameters,
        **_batch_facts(batch),
        "inner_steps": inner_steps,
        "inner_lr": inner_lr,
        "beta": beta,
        "rows": m.rows,
        "kl_effect_cosine": m.kl_effect["cosine"],
        "kl_effect_rel_diff": m.kl_effect["rel_diff"],
        "k_steps_clip_frac": m.stats["k_steps"].get("clip_frac"),
        "k_steps_ratio_mean": m.stats["k_steps"].get("ratio_mean"),
        "k_steps_kl": m.stats["k_steps_kl"].get("kl"),
        "mc_samples": mc_samples,
        "mc_tokens": sampler.sampled_tokens,
    }
    for v, row in zip(table, m.rows[1:], strict=True):
        result[f"{v.flat}_cosine"] = row["cosine"]
        result[f"{v.flat}_rel_diff"] = row["rel_diff"]
    return result


MC_SEED_OFFSET = 104_729
"""Added to the batch's sampling seed for the vine rows' continuations (as in training)."""


def _continuation_sampler(
    policy: Policy,
    task: Task,
    template: str,
    batch: Batch,
    *,
    seed: int,
    max_new_tokens: int,
    backend: str,
) -> ContinuationSampler:
    """The sampler of Monte-Carlo values for the vine rows: the batch's own sampling settings."""
    from rlino.rollout import SamplingConfig
    from rlino.step import ContinuationSampler

    sampling = SamplingConfig(
        temperature=1.0, max_new_tokens=max_new_tokens, stop_strings=task.stop_strings(template)
    )
    return ContinuationSampler(
        None,
        batch.scored,
        seed * SAMPLING_SEED_STRIDE + batch.attempt + MC_SEED_OFFSET,
        policy=policy,
        task=task,
        sampling=sampling,
        backend=backend,
    )


@dataclass
class Measured:
    """The rows of the table and what the summary needs besides them."""

    rows: list[dict[str, Any]]
    num_parameters: int
    stats: dict[str, dict[str, float]]
    """each variant's loss stats, by key"""
    kl_effect: dict[str, float]
    """k steps + kl against k steps"""


def _row(label: str, what: str, g: Any, g_ref: Any, stats: dict[str, float], kl: bool) -> dict:
    return {
        "label": label,
        "what": what,
        **compare_gradients(g, g_ref),
        "clip_frac": stats.get("clip_frac"),
        "kl": stats.get("kl") if kl else None,  # k3 KL to the reference
    }


def _params(v: Variant, fill: dict[str, Any]) -> MethodParams:
    """The variant's method params, with the command's beta when it has the KL term."""
    return replace(v.params, beta=fill["beta"]) if v.kl else v.params


def _measure(
    model: torch.nn.Module,
    batch: Batch,
    grpo: MethodParams,
    table: list[Variant],
    fill: dict[str, Any],
    micro: int,
    sampler: ContinuationSampler | None = None,
) -> Measured:
    """GRPO's on-policy gradient, then each variant's, compared with its `against` row's.

    A loss met twice (same params, model and log-probs) is differentiated once: the vine rows
    share one gradient and so one set of Monte-Carlo values. Only the gradients a later row
    needs are kept (a model's gradient is as large as its weights).
    """
    from rlino.update import MicroBatching, frozen_logprobs

    # the starting policy's log-probs: old log-probs off-policy, and the reference's for the KL
    base_logp = frozen_logprobs(model, batch.tokens, MicroBatching(micro))  # (N, Lc)
    g_grpo, _ = flat_gradient(model, batch.scored, batch.tokens, grpo, micro=micro)
    rows = [_row("grpo", "beta 0, ratio 1, seq-mean", g_grpo, g_grpo, {"clip_frac": 0.0}, False)]
    moved = None
    stats: dict[str, dict[str, float]] = {}
    grads: dict[str, torch.Tensor] = {"grpo": g_grpo}
    keep = {v.against for v in table} | {"k_steps", "k_steps_kl"}
    losses = [(repr(_params(v, fill)), v.moved, v.kl, v.redraw) for v in table]
    seen: dict[tuple[Any, ...], tuple[torch.Tensor, dict[str, float]]] = {}
    for v, loss in zip(table, losses, strict=True):
        if v.moved and moved is None:
            moved = _moved_copy(
                model, batch, grpo, base_logp, steps=fill["steps"], lr=fill["lr"], micro=micro
            )
        if loss in seen:
            g, stats[v.key] = seen[loss]
        else:
            g, stats[v.key] = flat_gradient(
                moved if v.moved else model,
                batch.scored,
                batch.tokens,
                _params(v, fill),
                micro=micro,
                old_logp=base_logp if v.moved else None,
                ref_logp=base_logp if v.kl else None,
                sampler=sampler,
            )
            if losses.count(loss) > 1:
                seen[loss] = g, stats[v.key]
        if v.key in keep:
            grads[v.key] = g
        what = v.what.format(**fill)
        rows.append(_row(v.label, what, g, grads[v.against], stats[v.key], v.kl))
    kl_effect = compare_gradients(grads["k_steps_kl"], grads["k_steps"])
    return Measured(rows, int(g_grpo.numel()), stats, kl_effect)
