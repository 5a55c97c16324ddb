"""`rlino analyze equivalence` on the terminal: load, measure, print the table and a plain reading.

The measurement itself is `rlino.analysis.equivalence.gradient_equivalence`.
"""

from __future__ import annotations

from typing import Any

from rlino.analysis.equivalence import gradient_equivalence


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

    from rlino.config import parse_task_options
    from rlino.policy import load_policy
    from rlino.resolve import resolve_target
    from rlino.tasks import get_task

    target = resolve_target(
        model,
        task,
        gguf_file=gguf_file,
        task_options=parse_task_options(task_opt),
        template=template,
    )
    task_obj = get_task(task, **target.task_options)
    policy = load_policy(target.model_path, gguf_file=gguf_file, device=device, dtype=dtype)
    result = gradient_equivalence(
        policy,
        task_obj,
        template=target.template,
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
