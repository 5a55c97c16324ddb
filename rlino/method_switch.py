"""Switching a preset's method block to another method, keeping what still applies.

`rlino train -c PRESET --method NAME` and a compare entry on a preset both start from the preset's
`method:` settings: GRPO's beta, clip_eps, mu, aggregation and surrogate should survive a switch to
grpo, and a switch to F-ISFT must drop beta (it has no reference model) instead of failing or
silently resetting everything to the defaults. This module decides which settings a method honours
and says, one line each, what it drops and why.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from rlino.methods import PRESETS, MethodParams, get_method

COMMON_PARAMS = frozenset(
    {"mu", "aggregation", "constant_length", "surrogate", "clip_eps", "weight_on"}
)
"""MethodParams fields every method honours: passes, loss aggregation and surrogate, weighting input."""


def applicable_params(name: str) -> frozenset[str]:
    """The MethodParams fields (besides `name`) that method or preset `name` honours.

    Used when a preset's method block is carried over to another method (`rlino train --method`):
    a setting the new method cannot use (beta without a reference model, alpha outside F-ISFT) is
    dropped rather than silently ignored or rejected.
    """
    method = get_method(name)
    own = set(COMMON_PARAMS) | set(method.knobs)
    if method.uses_kl:
        own.add("beta")
    if method.uses_dedup:
        own.add("dedup")
    fixed = PRESETS[name].fixed if name in PRESETS else {}
    return frozenset(own - set(fixed))


def carry_params(
    block: dict[str, Any], method: str, *, who: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """A preset's `method:` block switched to method `method` (`rlino train --method`, a compare
    entry on a preset).

    Keeps the settings `method` honours (`applicable_params`: e.g. beta, clip_eps, mu, aggregation
    of a GRPO preset stay for grpo), so the preset's own values are not silently reset to the
    defaults, and drops the rest. Returns the new block and, per dropped setting whose value differs
    from what `method` will use, a one-line note saying why. Keys that are no MethodParams field
    are kept, so a typo still fails validation. Raises UserError for an unknown method.
    """
    keep = applicable_params(method)
    known = {f.name for f in fields(MethodParams)} - {"name"}
    carried: dict[str, Any] = {"name": method}
    notes: dict[str, str] = {}
    for key, value in block.items():
        if key == "name":
            continue
        if key in keep or key not in known:
            carried[key] = value
            continue
        reason, used = _drop_reason(key, method)
        if value != used:
            notes[key] = f"note: {who} drops method.{key}={value} ({reason})"
    return carried, notes


def _drop_reason(key: str, method: str) -> tuple[str, Any]:
    """Why `method` cannot take setting `key`, and the value it uses instead."""
    preset = PRESETS.get(method)
    if preset is not None and key in preset.fixed:
        return f"{method} fixes {key}={preset.fixed[key]}", preset.fixed[key]
    used = getattr(MethodParams(), key)
    reasons = {
        "beta": f"{method} has no reference model",
        "alpha": f"alpha is F-ISFT's weight split; {method} does not use it",
        "scale_std": f"{method} does not divide by the group std",
        "std": f"{method} does not divide by the group std",
        "std_eps": f"{method} does not divide by the group std",
        "dedup": f"{method} does not deduplicate (raft only)",
        "mc_samples": f"{method} samples no Monte-Carlo values (vine only)",
    }
    return reasons.get(key, f"{method} does not use it"), used
