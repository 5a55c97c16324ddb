"""Methods as weightings: each turns a scored batch of samples into weights.

Under the usual LLM-MDP assumptions (the paper, arXiv 2505.13697) GRPO is filtered iterative SFT:
every method here raises or lowers the log-likelihood of self-generated samples, each with its own
weight. A `Method` is therefore data, not a trainer subclass:

- `weighting(batch, params, sampler) -> weights`: one weight per sample, (P, G) for P prompts x G
  samples, or, for a method with `per_token=True`, one per completion token, (N, T) with
  N = P * G; `weigh` is the only way weights are computed (the training step, the equivalence
  analysis and the benchmarks all call it);
- `surrogate`: "clipped" (GRPO's ratio-clipped objective) or "likelihood" (plain weighted
  log-likelihood); `rlino.losses.policy_loss` turns weights into a loss;
- `uses_kl` (may pull toward a frozen reference with beta > 0) and `group_relative` (needs G >= 2).

The batch (`ScoredBatch`) carries rewards, binary correctness and the completions' token ids; the
`sampler`, when the caller has one, draws and scores fresh continuations of partial completions
(Monte-Carlo values), so a method that needs extra sampling still runs in the one loop.

Built in: `grpo`, `fisft` (presets `fisft+`, `fisft-`, `fisft+-`), `fisft-grpo`, `raft`, and the
presets `grpo-nokl` and `dr-grpo`. Adding a method is one function and one call::

    from rlino.methods import Method, register_method

    def best_of_group(batch, params, sampler):
        # weight 1 on each group's top-reward samples (ties share it), 0 elsewhere
        r = batch.rewards  # (P, G)
        top = (r == r.max(dim=1, keepdim=True).values).float()  # (P, G)
        return top / top.sum(dim=1, keepdim=True)

    register_method(Method("best-of-group", "SFT on each group's best sample", best_of_group,
                           surrogate="likelihood", uses_kl=False, group_relative=False))

Then `method.name=best-of-group` selects it in any config. torch is imported inside the weighting
functions only, so the config and CLI can import this module cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from rlino.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

AGGREGATIONS = ("seq-mean", "token-mean", "constant")
SURROGATES = ("clipped", "likelihood")
WEIGHT_ON = ("reward", "correct")
STD_KINDS = ("population", "sample")

# Rewards closer than this count as equal: a group whose spread is float noise is filtered, not
# blown up by dividing by a near-zero std.
REWARD_TOL = 1e-6


@dataclass
class MethodParams:
    """Which method and its knobs; embedded in the training config under `method:`."""

    name: str = "grpo"
    """method or preset name (registry key), e.g. grpo, fisft+, fisft-grpo, raft"""
    alpha: float = 0.5
    """fisft: weight split, +(1 - alpha) above the group mean, -alpha below"""
    scale_std: bool = True
    """grpo / fisft-grpo: divide by the group's std (False = Dr. GRPO)"""
    clip_eps: float = 0.2
    """grpo: ratio clip range, ratio kept in [1 - clip_eps, 1 + clip_eps]"""
    beta: float = 0.0
    """grpo: KL coefficient to the frozen reference (k3 estimator); 0 = no reference model loaded"""
    mu: int = 1
    """passes over each rollout batch (grpo's ratio corrects the drift; likelihood methods don't)"""
    aggregation: str = "seq-mean"
    """token loss to scalar: seq-mean (per-sample 1/|o|), token-mean (DAPO), constant (Dr. GRPO)"""
    constant_length: int | None = None
    """for aggregation=constant: the divisor (default: max_new_tokens, filled by the trainer)"""
    dedup: bool = False
    """raft: count identical correct completions in a group once"""
    surrogate: str | None = None
    """clipped (GRPO's ratio-clipped loss) or likelihood (plain weighted log-likelihood); None =
    the method's own (grpo: clipped; fisft, fisft-grpo, raft: likelihood). The paper's authors ran
    F-ISFT through the clipped loss: it differs from the likelihood from the second minibatch on"""
    weight_on: str = "reward"
    """what the group weighting compares: reward (the shaped reward, e.g. Countdown's 0.1 for a
    wrong but well-formed answer, as in the authors' code) or correct (binary success only)"""
    std: str = "population"
    """grpo / fisft-grpo: the group std that scales weights: population (the paper's derivation,
    A+ = sqrt((1-p)/p)) or sample (Bessel's n - 1, as TRL and verl)"""
    std_eps: float = 0.0
    """grpo / fisft-grpo: added to the group std before dividing (verl 1e-6, TRL 1e-4)"""
    mc_samples: int = 4
    """vine: continuations sampled from each step boundary; their mean reward is its value (K)"""
    positive_weight: float = 0.1
    """w-reinforce: weight on correct samples (wrong ones get -1); Zhu et al. 2025 used 0.1"""

    def validate(self, group_size: int) -> None:
        """Raise UserError (one line) if these params can't work with `group_size` samples."""
        preset = PRESETS.get(self.name)
        if preset is not None:
            _check_preset_conflicts(self.name, preset, self)
        method, p = resolve(self)
        if p.aggregation not in AGGREGATIONS:
            raise UserError(
                f"unknown aggregation {p.aggregation!r}; known: {', '.join(AGGREGATIONS)}"
            )
        if group_size < 1:
            raise UserError(f"samples per prompt must be at least 1 (got {group_size})")
        if method.group_relative and group_size < 2:
            raise UserError(
                f"method {self.name!r} compares samples within a group and needs at least 2 "
                f"samples per prompt (got {group_size})"
            )
        if not 0.0 <= p.alpha <= 1.0:
            raise UserError(f"method.alpha must be in [0, 1] (got {p.alpha})")
        if p.clip_eps <= 0:
            raise UserError(f"method.clip_eps must be > 0 (got {p.clip_eps})")
        if p.beta < 0:
            raise UserError(f"method.beta must be >= 0 (got {p.beta}); 0 disables the KL term")
        if p.beta > 0 and not method.uses_kl:
            raise UserError(
                f"method {self.name!r} has no reference model: set method.beta=0 (got {p.beta}) "
                "or use grpo"
            )
        if p.mu < 1:
            raise UserError(f"method.mu (passes per rollout batch) must be >= 1 (got {p.mu})")
        if p.constant_length is not None and p.constant_length < 1:
            raise UserError(f"method.constant_length must be >= 1 (got {p.constant_length})")
        if p.dedup and not method.uses_dedup:
            raise UserError(f"method.dedup applies to raft only, not to {self.name!r}")
        if p.surrogate is not None and p.surrogate not in SURROGATES:
            raise UserError(
                f"method.surrogate must be one of {', '.join(SURROGATES)} (got {p.surrogate!r})"
            )
        if p.weight_on not in WEIGHT_ON:
            raise UserError(f"method.weight_on must be reward or correct (got {p.weight_on!r})")
        if p.std not in STD_KINDS:
            raise UserError(f"method.std must be population or sample (got {p.std!r})")
        if p.std_eps < 0:
            raise UserError(f"method.std_eps must be >= 0 (got {p.std_eps})")
        if p.mc_samples < 1:
            raise UserError(f"method.mc_samples must be >= 1 (got {p.mc_samples})")
        if p.positive_weight < 0:
            raise UserError(f"method.positive_weight must be >= 0 (got {p.positive_weight})")


@dataclass
class ScoredBatch:
    """What a weighting sees: P prompts x G samples, verified, and the completions' token ids."""

    rewards: Tensor
    """(P, G) shaped rewards (e.g. Countdown's 1 / 0.1 / 0)"""
    correct: Tensor
    """(P, G) bool, binary success, kept apart from the reward"""
    completion_ids: Tensor | None = None
    """(N, T) completion token ids, N = P * G in group order (None in hand-built batches)"""
    completion_mask: Tensor | None = None
    """(N, T) bool, True on real completion tokens"""

    def completion(self, k: int) -> tuple[int, ...]:
        """The token ids of sample `k` (row-major over (P, G)), padding removed."""
        if self.completion_ids is None or self.completion_mask is None:
            raise ValueError("this batch carries no completion token ids")
        return tuple(self.completion_ids[k][self.completion_mask[k]].tolist())


class Sampler(Protocol):
    """Draws and scores K fresh continuations of partial completions: Monte-Carlo values."""

    def continuation_rewards(
        self, rows: Sequence[int], prefixes: Sequence[Sequence[int]], k: int
    ) -> Tensor:
        """(len(rows), k) rewards of k continuations of sample `rows[i]`'s prompt + `prefixes[i]`."""
        ...


WeightingFn = Callable[[ScoredBatch, "MethodParams", "Sampler | None"], "Tensor"]


@dataclass(frozen=True)
class Method:
    """A training method as data: a weighting rule plus the shape of its loss."""

    name: str
    """registry key"""
    description: str
    """one line for `--help` and reports"""
    weighting: WeightingFn
    """(batch, params, sampler or None) -> (P, G) weights, or (N, T) when `per_token`"""
    surrogate: Literal["clipped", "likelihood"]
    """clipped ratio surrogate (grpo) or plain weighted log-likelihood"""
    uses_kl: bool
    """may use beta > 0 (loads a frozen reference model)"""
    group_relative: bool
    """weights compare samples within a group, so it needs G >= 2"""
    uses_dedup: bool = False
    """honours params.dedup (reads the completions' token ids)"""
    per_token: bool = False
    """returns one weight per completion token (N, T) instead of one per sample (P, G)"""
    knobs: tuple[str, ...] = ()
    """the MethodParams fields of its own weighting (e.g. fisft: alpha); see rlino.method_switch"""

    def __post_init__(self) -> None:
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")


@dataclass(frozen=True)
class Preset:
    """A name for a base method with some params fixed, e.g. fisft+ = fisft with alpha 0."""

    base: str
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""


METHODS: dict[str, Method] = {}
PRESETS: dict[str, Preset] = {}


def register_method(m: Method) -> Method:
    """Add `m` to the registry under `m.name` and return it; a name may be registered once."""
    if m.name in METHODS or m.name in PRESETS:
        raise ValueError(f"method name {m.name!r} is already registered")
    METHODS[m.name] = m
    return m


def register_preset(name: str, base: str, description: str = "", **fixed: Any) -> Preset:
    """Register `name` as method `base` with the MethodParams fields in `fixed` set."""
    if name in METHODS or name in PRESETS:
        raise ValueError(f"method name {name!r} is already registered")
    if base not in METHODS:
        raise ValueError(f"preset {name!r}: unknown base method {base!r}")
    known = {f.name for f in fields(MethodParams)}
    if unknown := set(fixed) - known:
        raise ValueError(f"preset {name!r}: unknown MethodParams fields {sorted(unknown)}")
    PRESETS[name] = Preset(base, dict(fixed), description)
    return PRESETS[name]


def method_names() -> list[str]:
    """All names a config may use: base methods and presets."""
    return sorted([*METHODS, *PRESETS])


def get_method(name: str) -> Method:
    """The Method behind `name`; a preset gives its base method (`resolve` also fixes params)."""
    if name in PRESETS:
        return METHODS[PRESETS[name].base]
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    return METHODS[name]


def resolve(params: MethodParams) -> tuple[Method, MethodParams]:
    """Expand a preset name: (base Method, params with the preset's fixed values and base name)."""
    preset = PRESETS.get(params.name)
    if preset is not None:
        params = replace(params, name=preset.base, **preset.fixed)
    return get_method(params.name), params


def _check_preset_conflicts(name: str, preset: Preset, params: MethodParams) -> None:
    """A preset wins over defaults, but a value the user clearly set against it is an error."""
    defaults = MethodParams()
    for key, value in preset.fixed.items():
        given = getattr(params, key)
        if given != value and given != getattr(defaults, key):
            raise UserError(
                f"method {name!r} fixes {key}={value!r} but {key}={given!r} was given; "
                f"use method {preset.base!r} to set {key} yourself"
            )


def weigh(
    method: Method, params: MethodParams, batch: ScoredBatch, sampler: Sampler | None = None
) -> Tensor:
    """The weights of a scored batch under `method`: (P, G), or (N, T) for a per-token method.

    The one entry point for weights: it checks the batch and the result's shape, so a weighting
    bug surfaces here rather than as a silently mis-broadcast loss.
    """
    rewards, correct = batch.rewards, batch.correct
    if rewards.dim() != 2 or rewards.shape != correct.shape:
        raise ValueError(
            f"rewards and correct must both be (P, G); got {tuple(rewards.shape)} and "
            f"{tuple(correct.shape)}"
        )
    ids = batch.completion_ids
    if ids is not None and ids.shape[0] != rewards.numel():
        raise ValueError(f"{ids.shape[0]} completions for {rewards.numel()} rewards")
    if method.per_token and ids is None:
        raise ValueError(f"method {method.name!r} weighs tokens: it needs the completions' ids")
    if params.weight_on == "correct":  # compare binary success, not the shaped reward
        batch = replace(batch, rewards=correct.to(rewards.dtype))
    weights = method.weighting(batch, params, sampler)
    if method.per_token:
        if ids is None or weights.shape != ids.shape:
            raise ValueError(
                f"method {method.name!r} must return (N, T) = {tuple(ids.shape)} per-token "
                f"weights, got {tuple(weights.shape)}"
            )
    elif weights.shape != rewards.shape:
        raise ValueError(
            f"method {method.name!r} must return (P, G) = {tuple(rewards.shape)} weights, "
            f"got {tuple(weights.shape)}"
        )
    return weights


def filtered_groups(rewards: Tensor) -> Tensor:
    """(P,) bool: groups whose rewards are all equal (within REWARD_TOL), so nothing to compare.

    These are the "filter" of filtered iterative SFT: every group-relative method gives them
    weight 0. The one definition used by the weightings, the training metrics and the analyses.
    """
    return rewards.double().std(dim=1, correction=0) <= REWARD_TOL  # (P,)


# ---- built-in weightings ---------------------------------------------------------------------


def group_standardised(
    batch: ScoredBatch, params: MethodParams, sampler: Sampler | None = None
) -> Tensor:
    """GRPO's weight (R - mean) / (std + std_eps) per group; filtered groups get 0.

    With the population std (the default) and binary rewards with a fraction p correct this is
    A+ = sqrt((1-p)/p) for the correct and A- = -sqrt(p/(1-p)) for the wrong, so each group's
    weights sum to zero. `std: sample` (Bessel's n - 1, as TRL and verl) gives sqrt((G-1)/G) of
    that. scale_std=False gives Dr. GRPO's R - mean.
    """
    import torch

    r = batch.rewards.double()  # (P, G); float64 so std of a near-constant group is not noise
    centred = r - r.mean(dim=1, keepdim=True)  # (P, G)
    correction = 0 if params.std == "population" else 1
    std = r.std(dim=1, correction=correction, keepdim=True) + params.std_eps  # (P, 1)
    flat = filtered_groups(batch.rewards)[:, None]  # (P, 1)
    scale = torch.where(flat, torch.ones_like(std), std) if params.scale_std else 1.0
    weights = torch.where(flat, torch.zeros_like(centred), centred / scale)  # (P, G)
    return weights.to(batch.rewards.dtype)


def above_below_mean(
    batch: ScoredBatch, params: MethodParams, sampler: Sampler | None = None
) -> Tensor:
    """F-ISFT: +(1 - alpha) above the group's mean reward, 0 at it, -alpha below."""
    r = batch.rewards.double()  # (P, G)
    diff = r - r.mean(dim=1, keepdim=True)  # (P, G)
    above = (diff > REWARD_TOL).double()
    below = (diff < -REWARD_TOL).double()
    return ((1.0 - params.alpha) * above - params.alpha * below).to(batch.rewards.dtype)


def correct_only(
    batch: ScoredBatch, params: MethodParams, sampler: Sampler | None = None
) -> Tensor:
    """RAFT: weight 1 on each correct sample, 0 else; with dedup, repeats within a group get 0."""
    weights = batch.correct.to(batch.rewards.dtype).clone()  # (P, G)
    if not params.dedup:
        return weights
    n_prompts, group = weights.shape
    for i in range(n_prompts):
        seen: set[tuple[int, ...]] = set()
        for j in range(group):
            if not batch.correct[i, j]:
                continue
            ids = batch.completion(i * group + j)
            if ids in seen:
                weights[i, j] = 0.0
            seen.add(ids)
    return weights


register_method(
    Method(
        "grpo",
        "GRPO: standardised group advantages, clipped ratio, optional KL to a reference",
        group_standardised,
        surrogate="clipped",
        uses_kl=True,
        group_relative=True,
        knobs=("scale_std", "std", "std_eps"),
    )
)
register_method(
    Method(
        "fisft",
        "filtered iterative SFT: +(1-alpha) above the group mean, -alpha below, no ratio",
        above_below_mean,
        surrogate="likelihood",
        uses_kl=False,
        group_relative=True,
        knobs=("alpha",),
    )
)
register_method(
    Method(
        "fisft-grpo",
        "filtered iterative SFT with GRPO's weights (A+ = sqrt((1-p)/p)), no ratio, no reference",
        group_standardised,
        surrogate="likelihood",
        uses_kl=False,
        group_relative=True,
        knobs=("scale_std", "std", "std_eps"),
    )
)
register_method(
    Method(
        "raft",
        "rejection-sampling fine-tuning: likelihood of correct samples, weight 1",
        correct_only,
        surrogate="likelihood",
        uses_kl=False,
        group_relative=False,
        uses_dedup=True,
    )
)
register_preset("fisft+", "fisft", "F-ISFT+: raise above-mean samples only", alpha=0.0)
register_preset("fisft-", "fisft", "F-ISFT-: lower below-mean samples only", alpha=1.0)
register_preset("fisft+-", "fisft", "F-ISFT+-: +0.5 above, -0.5 below the mean", alpha=0.5)
register_preset("grpo-nokl", "grpo", "GRPO without the KL term", beta=0.0)
register_preset(
    "dr-grpo",
    "grpo",
    "Dr. GRPO: no std scaling, constant divisor",
    scale_std=False,
    aggregation="constant",
)

import rlino.reinforce_methods  # noqa: E402, F401  (registers nsr, psr, w-reinforce)
from rlino import vine  # noqa: E402, F401  (registers vine: Monte-Carlo step credit)
