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
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlino.errors import UserError
from rlino.methods import REWARD_TOL, MethodParams, resolve

if TYPE_CHECKING:
    import torch

    from rlino.policy import Policy
    from rlino.tasks import Example, Task


@dataclass
class Batch:
    """One verified rollout batch laid out for scoring: ids (N, Lp+Lc), masks, rewards (P, G)."""

    ids: torch.Tensor  # (N, Lp + Lc)
    attn: torch.Tensor  # (N, Lp + Lc)
    mask: torch.Tensor  # (N, Lc) completion tokens
    start: int  # first completion column
    rewards: torch.Tensor  # (P, G)
    correct: torch.Tensor  # (P, G) bool
    lengths: torch.Tensor  # (P, G)
    attempt: int  # how many all-filtered batches were redrawn before this one


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

    A batch where every group's rewards are equal carries no gradient for any group-relative
    method; it is redrawn (new prompts, new seed) up to `max_attempts` times, then UserError.
    """
    import torch

    from rlino.rollout import SamplingConfig, generate
    from rlino.train import encode_prompts

    pool: list[Example] = task.examples("train")
    if len(pool) < prompts:
        raise UserError(
            f"task {task.name!r} has {len(pool)} training examples, fewer than {prompts}"
        )
    sampling = SamplingConfig(
        temperature=1.0, max_new_tokens=max_new_tokens, stop_strings=task.stop_strings(template)
    )
    policy.model.eval()
    for attempt in range(max_attempts):
        g = torch.Generator().manual_seed(seed * 1009 + attempt)
        examples = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:prompts]]
        prompt_ids = encode_prompts(policy, task, examples, template)
        r = generate(
            policy, prompt_ids, samples, sampling, seed=seed * 7919 + attempt, backend=backend
        )
        texts = r.texts(policy.tokenizer)
        scores = [
            task.score(t, examples[int(i)]) for t, i in zip(texts, r.prompt_index, strict=True)
        ]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32).view(
            prompts, samples
        )
        if bool((rewards.std(dim=1, correction=0) > REWARD_TOL).any()):
            return Batch(
                ids=torch.cat([r.prompt_ids, r.completion_ids], dim=1).to(policy.device),
                attn=torch.cat([r.prompt_mask, r.completion_mask], dim=1).to(policy.device),
                mask=r.completion_mask.to(policy.device),
                start=r.prompt_ids.shape[1],
                rewards=rewards,
                correct=torch.tensor([s.correct for s in scores]).view(prompts, samples),
                lengths=r.completion_mask.sum(dim=1).view(prompts, samples),
                attempt=attempt,
            )
    raise UserError(
        f"no learning signal: in {max_attempts} batches of {prompts} prompts x {samples} samples "
        "every group's samples got the same reward (all groups filtered); use more --prompts or "
        "--samples, or a model that solves the task sometimes"
    )


# ---------------------------------------------------------------- gradients


def _row_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def frozen_logprobs(model: torch.nn.Module, batch: Batch, micro: int) -> torch.Tensor:
    """(N, Lc) completion log-probs without gradient (old or reference log-probs)."""
    import torch

    from rlino.policy import token_logprobs

    out = torch.zeros(batch.mask.shape, device=batch.mask.device)  # (N, Lc)
    with torch.no_grad():
        for rows in _row_slices(batch.ids.shape[0], micro):
            out[rows] = token_logprobs(
                model, batch.ids[rows], batch.attn[rows], batch.start
            ).float()
    return out


def batch_loss_backward(
    model: torch.nn.Module,
    batch: Batch,
    params: MethodParams,
    *,
    micro: int,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> dict[str, float]:
    """Backward of the method's loss over the whole batch (accumulated exactly over micro-batches).

    Returns the loss stats averaged with the same shares (so clip_frac is over the whole batch).
    """
    from rlino.losses import micro_batch_share, policy_loss
    from rlino.policy import token_logprobs

    method, resolved = resolve(params)
    if resolved.aggregation == "constant" and resolved.constant_length is None:
        resolved.constant_length = batch.mask.shape[1]
    adv = method.advantages(batch.rewards, batch.correct, resolved, None)  # (P, G)
    adv = adv.reshape(-1).to(batch.mask.device)  # (N,)
    totals: dict[str, float] = {}
    for rows in _row_slices(batch.ids.shape[0], micro):
        logp = token_logprobs(model, batch.ids[rows], batch.attn[rows], batch.start).float()
        loss, stats = policy_loss(
            method,
            resolved,
            logp,
            batch.mask[rows],
            adv[rows],
            old_logp=None if old_logp is None else old_logp[rows],
            ref_logp=None if ref_logp is None else ref_logp[rows],
        )
        share = micro_batch_share(batch.mask[rows], batch.mask, resolved.aggregation)
        (loss * share).backward()
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + float(value) * share
    return totals


def flat_gradient(
    model: torch.nn.Module, batch: Batch, params: MethodParams, **kwargs: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss's gradient w.r.t. every trainable parameter, flattened to one fp32 vector."""
    import torch

    model.zero_grad(set_to_none=True)
    stats = batch_loss_backward(model, batch, params, **kwargs)
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
        for p in model.parameters()
        if p.requires_grad
    ]
    model.zero_grad(set_to_none=True)
    return torch.cat(parts), stats  # (num_params,)


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


# ---------------------------------------------------------------- the experiment


ROW_KEYS = {
    "grpo": "grpo",
    "fisft-grpo": "fisft",
    "fisft+-": "fisft_pm",
    "fisft+": "fisft_plus",
    "grpo token-mean": "token_mean",
    "grpo constant": "constant",
    "grpo + kl": "kl_start",
    "grpo k steps": "k_steps",
    "grpo k steps + kl": "k_steps_kl",
}
"""Row label -> short key used in the JSON (`grpo_vs_<key>_cosine`, `grpo_vs_<key>_rel_diff`)."""


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
) -> dict[str, Any]:
    """Gradients of GRPO and its F-ISFT relatives on one real batch, compared with GRPO's.

    Returns a JSON-ready dict: `rows` (label, what, cosine, rel_diff, norm, clip_frac, kl), the
    flat `grpo_vs_<key>_cosine` / `_rel_diff` numbers (key in ROW_KEYS; `grpo_vs_fisft_cosine` is
    GRPO vs fisft-grpo), `kl_effect_cosine` (k steps with vs without KL) and batch facts. The
    policy's weights are left unchanged (the k-step model is a copy). Deterministic for a seed.
    """
    import torch

    if prompts < 1 or samples < 2:
        raise UserError("need at least 1 prompt and 2 samples per prompt (groups compare samples)")
    if inner_steps < 1:
        raise UserError(f"inner steps must be >= 1 (got {inner_steps})")
    if beta <= 0:
        raise UserError(f"beta must be > 0 for the KL rows (got {beta})")
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
    model = policy.model
    model.eval()  # no dropout: the gradients must be deterministic functions of the weights
    micro = micro_batch_size
    grpo = MethodParams(name="grpo", beta=0.0, clip_eps=clip_eps)
    base_logp = frozen_logprobs(model, batch, micro)  # (N, Lc) = old and reference log-probs

    g_grpo, _ = flat_gradient(model, batch, grpo, micro=micro)
    rows: list[dict[str, Any]] = []

    def add(
        label: str, what: str, g: torch.Tensor, stats: dict[str, float], ref: torch.Tensor
    ) -> None:
        rows.append(
            {
                "label": label,
                "what": what,
                **compare_gradients(g, ref),
                "clip_frac": stats.get("clip_frac"),
                "kl": stats.get("kl") if "+ kl" in label else None,  # k3 KL to the reference
            }
        )

    add("grpo", "beta 0, ratio 1, seq-mean", g_grpo, {"clip_frac": 0.0}, g_grpo)
    variants = [
        ("fisft-grpo", "likelihood, weights A+/A-", MethodParams(name="fisft-grpo")),
        (
            "fisft+-",
            f"likelihood, +{1 - alpha:g}/-{alpha:g}",
            MethodParams(name="fisft", alpha=alpha),
        ),
        ("fisft+", "likelihood, +1/0", MethodParams(name="fisft+")),
        (
            "grpo token-mean",
            "mean over the batch's tokens",
            MethodParams(name="grpo", clip_eps=clip_eps, aggregation="token-mean"),
        ),
        (
            "grpo constant",
            "sum / (N x max length)",
            MethodParams(name="grpo", clip_eps=clip_eps, aggregation="constant"),
        ),
    ]
    for label, what, params in variants:
        g, stats = flat_gradient(model, batch, params, micro=micro)
        add(label, what, g, stats, g_grpo)
        del g
    kl_params = MethodParams(name="grpo", beta=beta, clip_eps=clip_eps)
    g, stats = flat_gradient(model, batch, kl_params, micro=micro, ref_logp=base_logp)
    add(
        "grpo + kl",
        f"beta {beta:g}, reference = policy",
        g,
        stats,
        g_grpo,
    )
    del g

    moved = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(
        [p for p in moved.parameters() if p.requires_grad], lr=inner_lr, weight_decay=0.0
    )
    for _ in range(inner_steps):
        optimizer.zero_grad(set_to_none=True)
        batch_loss_backward(moved, batch, grpo, micro=micro, old_logp=base_logp)
        optimizer.step()
    del optimizer
    g_k, stats_k = flat_gradient(moved, batch, grpo, micro=micro, old_logp=base_logp)
    add(
        "grpo k steps",
        f"{inner_steps} AdamW steps, lr {inner_lr:g}",
        g_k,
        stats_k,
        g_grpo,
    )
    g_kl, stats_kl = flat_gradient(
        moved, batch, kl_params, micro=micro, old_logp=base_logp, ref_logp=base_logp
    )
    add(
        "grpo k steps + kl",
        f"same, + beta {beta:g} KL to start",
        g_kl,
        stats_kl,
        g_grpo,
    )
    kl_effect = compare_gradients(g_kl, g_k)
    del moved, g_k, g_kl

    lengths, correct = batch.lengths.float(), batch.correct
    informative = (batch.rewards.std(dim=1, correction=0) > REWARD_TOL).float()
    result: dict[str, Any] = {
        "model": policy.source,
        "task": task.name,
        "template": template,
        "prompts": prompts,
        "samples": samples,
        "seed": seed,
        "redrawn_batches": batch.attempt,
        "num_parameters": int(g_grpo.numel()),
        "groups_informative": int(informative.sum()),
        "accuracy": float(correct.float().mean()),
        "reward_mean": float(batch.rewards.mean()),
        "length_mean": float(lengths.mean()),
        "length_std": float(lengths.std(correction=0)),
        "length_correct": float(lengths[correct].mean()) if bool(correct.any()) else None,
        "length_wrong": float(lengths[~correct].mean()) if bool((~correct).any()) else None,
        "inner_steps": inner_steps,
        "inner_lr": inner_lr,
        "beta": beta,
        "rows": rows,
        "kl_effect_cosine": kl_effect["cosine"],
        "kl_effect_rel_diff": kl_effect["rel_diff"],
        "k_steps_clip_frac": stats_k.get("clip_frac"),
        "k_steps_ratio_mean": stats_k.get("ratio_mean"),
        "k_steps_kl": stats_kl.get("kl"),
    }
    for row in rows[1:]:
        key = ROW_KEYS[row["label"]]
        result[f"grpo_vs_{key}_cosine"] = row["cosine"]
        result[f"grpo_vs_{key}_rel_diff"] = row["rel_diff"]
    return result


def render_table(result: dict[str, Any]) -> Any:
    """A rich Table of the rows of `gradient_equivalence`."""
    from rich.table import Table

    table = Table(
        title=(
            f"Gradient vs GRPO (on-policy, beta 0, seq-mean) on one batch: "
            f"{result['prompts']} prompts x {result['samples']} samples, "
            f"{result['num_parameters']:,} parameters"
        ),
        caption="cosine and rel. diff = ||g - g_grpo|| / ||g_grpo|| against the first row",
    )
    for name in ("method", "setting", "cosine", "rel. diff", "||g||", "clip"):
        left = name in ("method", "setting")
        table.add_column(name, justify="left" if left else "right", no_wrap=name != "setting")
    for row in result["rows"]:
        clip = row["clip_frac"]
        table.add_row(
            row["label"],
            row["what"],
            f"{row['cosine']:.6f}",
            f"{row['rel_diff']:.2e}",
            f"{row['norm']:.3e}",
            "-" if clip is None else f"{clip:.3f}",
        )
    return table


def explain(result: dict[str, Any]) -> list[str]:
    """Plain-language lines printed under the table."""
    lc, lw = result["length_correct"], result["length_wrong"]
    lines = [
        f"batch: accuracy {result['accuracy']:.3f}, reward {result['reward_mean']:.3f}, "
        f"{result['groups_informative']}/{result['prompts']} groups with signal, "
        f"length {result['length_mean']:.1f} ± {result['length_std']:.1f} tokens"
        + (f" (correct {lc:.1f}, wrong {lw:.1f})" if lc is not None and lw is not None else ""),
        f"GRPO vs F-ISFT with GRPO's weights: cosine {result['grpo_vs_fisft_cosine']:.6f} "
        "(at ratio 1 the clipped surrogate's gradient is A * grad log pi: the same loss).",
        f"token-mean instead of seq-mean: cosine {result['grpo_vs_token_mean_cosine']:.4f} "
        "(same weights, no per-sample 1/|o|: differs as much as lengths differ).",
        "KL with the reference = the policy (first step of a run): k3's gradient 1 - pi_ref/pi "
        "is 0 per token, so the gradient is GRPO's.",
        f"after {result['inner_steps']} inner steps: clip fraction "
        f"{result['k_steps_clip_frac']:.3f}, mean ratio {result['k_steps_ratio_mean']:.4f}; "
        f"adding beta {result['beta']:g} x KL to the start there (KL {result['k_steps_kl']:.2e}) "
        f"changes the gradient by {result['kl_effect_rel_diff']:.2e} relative "
        f"(cosine {result['kl_effect_cosine']:.6f}).",
    ]
    if result["redrawn_batches"]:
        lines.insert(
            0,
            f"note: {result['redrawn_batches']} batch(es) had no signal (all groups filtered) "
            "and were redrawn",
        )
    return lines


def equivalence_command(
    *,
    model: str | None,
    gguf_file: str | None,
    task: str,
    task_opt: list[str],
    template: str | None,
    prompts: int,
    samples: int,
    seed: int,
    max_new_tokens: int,
    inner_steps: int,
    inner_lr: float,
    beta: float,
    device: str,
    dtype: str,
    json_out: bool,
) -> dict[str, Any]:
    """Body of `rlino analyze equivalence`: load, measure, print the table (and JSON last)."""
    import json

    from rich.console import Console

    from rlino.config import ModelConfig, TaskConfig, TrainConfig, parse_task_options
    from rlino.policy import load_policy
    from rlino.tasks import get_task
    from rlino.train import resolve_model_and_task

    options = parse_task_options(task_opt)
    config = TrainConfig(
        model=ModelConfig(path=model, gguf_file=gguf_file, device=device, dtype=dtype),
        task=TaskConfig(name=task, template=template, options=options),
    )
    path, gguf, options, template = resolve_model_and_task(config)
    task_obj = get_task(task, **options)
    policy = load_policy(path, gguf_file=gguf, device=device, dtype=dtype)
    result = gradient_equivalence(
        policy,
        task_obj,
        template=template,
        prompts=prompts,
        samples=samples,
        seed=seed,
        max_new_tokens=max_new_tokens,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        beta=beta,
    )
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the table on one line per row
        console = Console(width=120)
    console.print(render_table(result))
    for line in explain(result):
        console.print(line, highlight=False)
    if json_out:
        print(json.dumps(result), flush=True)
    return result
