"""Full-parameter gradients of a method's loss on one scored batch, and how two of them compare.

The loss goes through the training update's own micro-batched accumulation
(`rlino.update.accumulate_gradients`) and weights (`rlino.methods.weigh`), so what is compared
is what trains. Used by `rlino analyze equivalence`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rlino.methods import MethodParams, resolve, weigh

if TYPE_CHECKING:
    import torch

    from rlino.methods import Sampler
    from rlino.step import Scored
    from rlino.update import TokenBatch


def loss_backward(
    model: torch.nn.Module,
    scored: Scored,
    tokens: TokenBatch,
    params: MethodParams,
    *,
    micro: int,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    sampler: Sampler | None = None,
) -> dict[str, float]:
    """Backward of the method's loss over the whole batch; returns its k3 KL and, for the clipped
    surrogate, the clip fraction and mean ratio over every token of the batch. `sampler` is
    handed to the weighting (a Monte-Carlo method such as vine needs one)."""
    import torch

    from rlino.update import MicroBatching, accumulate_gradients, token_means

    method, resolved = resolve(params)
    if resolved.aggregation == "constant" and resolved.constant_length is None:
        resolved = replace(resolved, constant_length=tokens.mask.shape[1])
    weights = weigh(method, resolved, scored, sampler).to(tokens.mask.device)
    rows = torch.arange(len(tokens), device=tokens.mask.device)
    totals = accumulate_gradients(
        model,
        tokens,
        method,
        resolved,
        weights if method.per_token else weights.reshape(-1),
        rows,
        rows,
        MicroBatching(micro),
        old_logp=old_logp,
        ref_logp=ref_logp,
    )
    return {"kl": totals["kl"], **token_means(totals)}


def flat_gradient(
    model: torch.nn.Module, scored: Scored, tokens: TokenBatch, params: MethodParams, **kwargs: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss's gradient w.r.t. every trainable parameter, flattened to one fp32 vector."""
    from rlino.update import flat_grad

    model.zero_grad(set_to_none=True)
    stats = loss_backward(model, scored, tokens, params, **kwargs)
    grad = flat_grad(model)  # (num_params,)
    model.zero_grad(set_to_none=True)
    return grad, stats


def _dot(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 24) -> float:
    """a . b accumulated in float64 chunk by chunk (no full float64 copies of big vectors)."""
    return sum(
        float((a[i : i + chunk].double() * b[i : i + chunk].double()).sum())
        for i in range(0, a.numel(), chunk)
    )


def compare_gradients(g: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """cosine(g, ref), ||g - ref|| / ||ref|| and both norms."""
    gg, rr, gr = _dot(g, g), _dot(ref, ref), _dot(g, ref)
    norm_g, norm_r = math.sqrt(gg), math.sqrt(rr)
    diff = math.sqrt(max(gg + rr - 2.0 * gr, 0.0))
    return {
        "cosine": gr / (norm_g * norm_r) if norm_g > 0 and norm_r > 0 else float("nan"),
        "rel_diff": diff / norm_r if norm_r > 0 else float("nan"),
        "norm": norm_g,
        "ref_norm": norm_r,
    }
