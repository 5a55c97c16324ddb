"""Methods as weightings: each turns a scored group of samples into per-sample weights.

Under the usual LLM-MDP assumptions (GUIDE.md section 1) GRPO is filtered iterative SFT: every
method here raises or lowers the log-likelihood of self-generated samples, each with its own weight.
A `Method` is therefore data, not a trainer subclass:

- `advantages(rewards (P, G), correct (P, G), params, completions) -> (P, G)`: one weight per
  sample (P prompts, G samples per prompt);
- `surrogate`: "clipped" (GRPO's ratio-clipped objective) or "likelihood" (plain weighted
  log-likelihood); `rlino.losses.policy_loss` turns weights into a loss;
- `uses_kl` (may pull toward a frozen reference with beta > 0) and `group_relative` (needs G >= 2).

Built in: `grpo`, `fisft` (presets `fisft+`, `fisft-`, `fisft+-`), `fisft-grpo`, `raft`, and the
presets `grpo-nokl` and `dr-grpo`. Adding a method is one function and one call::

    from rlino.methods import Method, register_method

    def best_of_group(rewards, correct, params, completions):
        # weight 1 on each group's top-reward samples (ties share it), 0 elsewhere
        top = (rewards == rewards.max(dim=1, keepdim=True).values).float()  # (P, G)
        return top / top.sum(dim=1, keepdim=True)

    register_method(Method("best-of-group", "SFT on each group's best sample", best_of_group,
                           surrogate="likelihood", uses_kl=False, group_relative=False))

Then `method.name=best-of-group` selects it in any config. torch is imported inside the weighting
functions only, so the config and CLI can import this module cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from rlino.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

AGGREGATIONS = ("seq-mean", "token-mean", "constant")
SURROGATES = ("clipped", "likelihood")

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


AdvantageFn = Callable[["Tensor", "Tensor", MethodParams, "list[tuple[int, ...]] | None"], "Tensor"]


@dataclass(frozen=True)
class Method:
    """A training method as data: a weighting rule plus the shape of its loss."""

    name: str
    """registry key"""
    description: str
    """one line for `--help` and reports"""
    advantages: AdvantageFn
    """(rewards (P, G), correct (P, G) bool, params, completions or None) -> (P, G) weights"""
    surrogate: Literal["clipped", "likelihood"]
    """clipped ratio surrogate (grpo) or plain weighted log-likelihood"""
    uses_kl: bool
    """may use beta > 0 (loads a frozen reference model)"""
    group_relative: bool
    """weights compare samples within a group, so it needs G >= 2"""
    uses_dedup: bool = False
    """honours params.dedup (needs the completions' token ids)"""

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
    method: Method,
    params: MethodParams,
    rewards: Tensor,
    correct: Tensor,
    completions: list[tuple[int, ...]] | None = None,
) -> Tensor:
    """Per-sample weights (P, G) for a scored batch, after checking the shapes agree."""
    if rewards.dim() != 2 or rewards.shape != correct.shape:
        raise ValueError(
            f"rewards and correct must both be (P, G); got {tuple(rewards.shape)} and "
            f"{tuple(correct.shape)}"
        )
    if completions is not None and len(completions) != rewards.numel():
        raise ValueError(f"{len(completions)} completions for {rewards.numel()} rewards")
    return method.advantages(rewards, correct, params, completions)


# ---- built-in weightings ---------------------------------------------------------------------


def group_standardised(
    rewards: Tensor, correct: Tensor, params: MethodParams, completions: Any = None
) -> Tensor:
    """GRPO's advantage (R - mean) / std per group, population std; constant groups get 0.

    For binary rewards with a fraction p correct this is A+ = sqrt((1-p)/p) for the correct and
    A- = -sqrt(p/(1-p)) for the wrong, so each group's weights sum to zero. scale_std=False gives
    Dr. GRPO's R - mean.
    """
    import torch

    r = rewards.double()  # (P, G); float64 so std of a near-constant group is not noise
    centred = r - r.mean(dim=1, keepdim=True)  # (P, G)
    std = r.std(dim=1, correction=0, keepdim=True)  # (P, 1)
    flat = std <= REWARD_TOL  # (P, 1) groups with nothing to compare: the "filter"
    scale = torch.where(flat, torch.ones_like(std), std) if params.scale_std else 1.0
    adv = centred / scale  # (P, G)
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype)


def above_below_mean(
    rewards: Tensor, correct: Tensor, params: MethodParams, completions: Any = None
) -> Tensor:
    """F-ISFT: +(1 - alpha) above the group's mean reward, 0 at it, -alpha below."""
    r = rewards.double()  # (P, G)
    diff = r - r.mean(dim=1, keepdim=True)  # (P, G)
    above = (diff > REWARD_TOL).double()
    below = (diff < -REWARD_TOL).double()
    return ((1.0 - params.alpha) * above - params.alpha * below).to(rewards.dtype)


def correct_only(
    rewards: Tensor,
    correct: Tensor,
    params: MethodParams,
    completions: list[tuple[int, ...]] | None = None,
) -> Tensor:
    """RAFT: weight 1 on each correct sample, 0 else; with dedup, repeats within a group get 0."""
    weights = correct.to(rewards.dtype).clone()  # (P, G)
    if not params.dedup:
        return weights
    if completions is None:
        raise ValueError("raft with dedup needs the completions' token ids")
    n_prompts, group = weights.shape
    for i in range(n_prompts):
        seen: set[tuple[int, ...]] = set()
        for j in range(group):
            if not correct[i, j]:
                continue
            ids = tuple(completions[i * group + j])
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
