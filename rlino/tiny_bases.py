"""Built-in tiny Countdown bases of different strength: named recipes, built once, then cached.

Why: whether filtered SFT matches GRPO may depend on how often the base model is right (with rare
successes F-ISFT+-'s group weights are far from balanced). The shipped tiny base answers 21% of the
test prompts greedily; these recipes give weaker and stronger ones from the same pretraining code.
The knobs are the sloppiness of the synthetic traces (`rlino.tiny_corpus.TraceStyle`: how often a
try hits, whether the answer copies the hit, whether the search stops there) and the number of
pretraining steps, the one that buys capability: with tidy traces the model is limited by how well
it finds a hitting combination, which improves with steps.

- `RECIPES`: `countdown` (the shipped base's settings; `tiny:countdown` rebuilds them into the
  cache, `model.path: null` uses the shipped files), `countdown-weak`, `countdown-medium`,
  `countdown-strong`; `rlino pretrain --recipe NAME --out DIR` builds one.
- `ensure_base("tiny:NAME")`: the model directory of a recipe, pretrained on first use into the
  cache (`$RLINO_CACHE`, else `$XDG_CACHE_HOME/rlino`, else `~/.cache/rlino`) under a name that
  includes a hash of the full pretraining config, so a changed recipe is never confused with an
  old build. `rlino compare` calls it for the bases a comparison names.
- Every build records its greedy and temperature-1 accuracy on the first test examples in
  `base_eval.json` beside the weights (written last: a directory without it is incomplete).

Same recipe + same machine kind, thread count and torch build = the same weights, byte for byte
(see `rlino.tiny`); across CPUs the accuracies move by a point or two.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from rlino.errors import UserError
from rlino.tiny import DEFAULT_TASK_OPTIONS, PretrainConfig, pretrain
from rlino.tiny_corpus import TraceStyle

SCHEME = "tiny:"
"""Prefix of a built-in base reference in a config's `model.path` or a compare `bases:` entry."""
BASE_EVAL_FILE = "base_eval.json"
"""Greedy and sampled accuracy of a pretrained base, written beside its weights."""
EVAL_EXAMPLES = 200
"""Test examples a base is evaluated on (the first N, as the training loop's evaluation)."""
SAMPLED_PER_PROMPT = 8
"""Samples per prompt at temperature 1 for the sampled accuracy (mean@8: less noisy than one)."""


@dataclass(frozen=True)
class BaseRecipe:
    """A named pretraining config: trace style and steps over the shipped base's defaults."""

    name: str
    description: str
    style: TraceStyle
    steps: int = 1000

    def config(self, seed: int = 0) -> PretrainConfig:
        """The full PretrainConfig of this recipe."""
        return PretrainConfig(seed=seed, steps=self.steps, style=self.style)


RECIPES: dict[str, BaseRecipe] = {
    r.name: r
    for r in (
        BaseRecipe("countdown", "the shipped base: sloppy search, 1000 steps", TraceStyle()),
        BaseRecipe(
            "countdown-weak",
            "rare hits (0.15), answer copies the hit 40% of the time, 1000 steps",
            TraceStyle(hit=0.15, pick_hit=0.4),
        ),
        BaseRecipe(
            "countdown-medium",
            "tidy traces (hit 0.8, stop and copy 0.9), 1000 steps",
            TraceStyle(hit=0.8, stop_on_hit=0.9, pick_hit=0.9),
        ),
        BaseRecipe(
            "countdown-strong",
            "every trace's first try hits and is answered, 2000 steps",
            TraceStyle(hit=1.0, stop_on_hit=1.0, pick_hit=1.0),
            steps=2000,
        ),
    )
}
"""Greedy pass@1 on the first 200 test examples, measured on trial builds of exactly these
recipes (seed 0, a 16-core x86 machine, torch 2.11): weak 14.5%, the shipped settings 20.5% (the
shipped build: 21.0%), medium 32.0%, strong 60.0%; weak and strong rebuilt on the 2-core
development machine (torch 2.13) reached the same final loss and accuracy. Fourteen trial builds
in two parallel batches found the values; the seed matters by a few points (weak with seed 1:
18.0%, medium: 37.0%)."""


def recipe_name(ref: str) -> str:
    """`tiny:countdown-weak` or `countdown-weak` -> `countdown-weak`; UserError if unknown."""
    name = ref.removeprefix(SCHEME)
    if name not in RECIPES:
        raise UserError(f"unknown tiny base {ref!r}; known: {', '.join(sorted(RECIPES))}")
    return name


def is_tiny_ref(path: Any) -> bool:
    """Whether a model path names a built-in base recipe (`tiny:NAME`)."""
    return isinstance(path, str) and path.startswith(SCHEME)


def cache_dir() -> Path:
    """Where built bases are kept: $RLINO_CACHE, else $XDG_CACHE_HOME/rlino, else ~/.cache/rlino."""
    if os.environ.get("RLINO_CACHE"):
        return Path(os.environ["RLINO_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rlino"


def fingerprint(config: PretrainConfig) -> str:
    """A short hash of everything that decides the weights (the full config, threads included)."""
    text = json.dumps(asdict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_dir(ref: str) -> Path:
    """The cache directory of built-in base `ref` (it may not be built yet)."""
    name = recipe_name(ref)
    return cache_dir() / "bases" / f"{name}-{fingerprint(RECIPES[name].config())}"


def is_built(model_dir: Path) -> bool:
    """A base directory is complete once its evaluation is written (the last file of a build)."""
    return (model_dir / BASE_EVAL_FILE).is_file()


def ensure_base(ref: str, *, progress: bool = False, say: Any = None) -> Path:
    """The model directory of built-in base `ref`, pretrained and evaluated first if not cached.

    Built in a temporary directory and renamed into place, so a killed build leaves no directory
    that looks finished, and two processes building the same base at once both end with one.
    `say(text)` reports what happens (e.g. a console's print).
    """
    name = recipe_name(ref)
    target = base_dir(name)
    if is_built(target):
        return target
    if say is not None:
        say(f"building tiny base {name} into {target} (pretraining, CPU minutes; cached after)")
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(RECIPES[name].config(), tmp, progress=progress, recipe=name)
    if target.exists() and not is_built(target):
        shutil.rmtree(target)  # an incomplete directory of an older layout
    try:
        tmp.rename(target)
    except OSError:
        if not is_built(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same base first
    return target


def build(
    config: PretrainConfig,
    out: Path,
    *,
    progress: bool = True,
    recipe: str | None = None,
    eval_examples: int | None = None,
) -> dict[str, Any]:
    """Pretrain `config` into `out`, then evaluate it into `out/base_eval.json` on the first
    `eval_examples` test examples (None: EVAL_EXAMPLES; 0: no evaluation, no file); returns the
    pretraining summary and the evaluation."""
    if eval_examples is None:
        eval_examples = EVAL_EXAMPLES
    result = pretrain(config, out, progress=progress)
    summary: dict[str, Any] = {
        "recipe": recipe,
        "parameters": result.parameters,
        "pretrain_seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
    }
    if eval_examples > 0:
        summary.update(evaluate_base(out, eval_examples, threads=config.threads))
        tmp = out / f"{BASE_EVAL_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(out / BASE_EVAL_FILE)
    return summary


def evaluate_base(model_dir: Path, examples: int, *, threads: int = 2) -> dict[str, Any]:
    """Greedy pass@1 and temperature-1 accuracy (mean over 8 samples) on the first test examples."""
    import torch

    from rlino.evaluate import evaluate
    from rlino.policy import load_policy
    from rlino.resolve import task_settings
    from rlino.tasks import get_task

    torch.set_num_threads(threads)
    settings = task_settings(model_dir) or {"options": DEFAULT_TASK_OPTIONS, "template": "r1"}
    task = get_task("countdown", **settings["options"])
    subset = task.examples("test")[:examples]
    policy = load_policy(str(model_dir), device="cpu", dtype="fp32")
    template = settings.get("template")
    start = time.perf_counter()
    greedy = evaluate(policy, task, subset, template=template, temperature=0.0)
    sampled = evaluate(
        policy, task, subset, template=template, samples=SAMPLED_PER_PROMPT, temperature=1.0
    )
    return {
        "eval_examples": len(subset),
        "greedy_accuracy": greedy.accuracy,
        "sampled_accuracy": sampled.accuracy,
        "sampled_temperature": 1.0,
        "sampled_per_prompt": SAMPLED_PER_PROMPT,
        f"sampled_pass@{SAMPLED_PER_PROMPT}": sampled.pass_at[SAMPLED_PER_PROMPT],
        "greedy_format_rate": greedy.format_rate,
        "greedy_mean_length": greedy.mean_length,
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def style_with(style: TraceStyle, items: list[str]) -> TraceStyle:
    """`style` with `KEY=VALUE` overrides (`--style hit=0.5`); UserError for an unknown key."""
    from rlino.config import from_dict, parse_override

    data = asdict(style)
    for item in items:
        data.update(parse_override(item))
    known = {f.name for f in fields(TraceStyle)}
    if unknown := sorted(set(data) - known):
        raise UserError(f"unknown --style key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return from_dict(TraceStyle, data, "style")


def run_pretrain_command(
    *,
    out: str | None,
    recipe: str | None,
    task: str,
    seed: int,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    threads: int | None,
    style: list[str],
    task_opt: list[str],
    eval_examples: int,
    quiet: bool,
) -> None:
    """Body of `rlino pretrain`: a recipe (or the defaults) with the flags on top, then build."""
    from rlino.config import parse_override

    if eval_examples < 0:
        raise UserError(f"--eval-examples must be >= 0 (got {eval_examples})")
    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "threads": threads}
    if out is None:
        if recipe is None:
            raise UserError("give --out DIR, or --recipe NAME to build into the cache")
        if any(v is not None for v in given.values()) or style or task_opt or seed != 0:
            raise UserError("--recipe without --out builds the recipe as is; add --out DIR")
        path = ensure_base(recipe, progress=not quiet, say=None if quiet else print)
        print(f"{path}\n{(path / BASE_EVAL_FILE).read_text().strip()}")
        return
    name = recipe_name(recipe) if recipe is not None else None
    config = RECIPES[name].config(seed) if name else PretrainConfig(task=task, seed=seed)
    config.task = task
    for item in task_opt:
        config.task_options.update(parse_override(item))
    for key, value in given.items():
        if value is not None:
            setattr(config, key, value)
    config = replace(config, style=style_with(config.style, style))
    if name is not None and config != RECIPES[name].config(seed):
        name = None  # flags changed the recipe: the build is not that recipe any more
    summary = build(config, Path(out), progress=not quiet, recipe=name, eval_examples=eval_examples)
    line = (
        f"saved {out} ({summary['parameters']:,} parameters, {summary['pretrain_seconds']:.0f} s, "
        f"final loss {summary['final_loss']:.3f})"
    )
    if "greedy_accuracy" in summary:
        line += (
            f"; greedy pass@1 {100 * summary['greedy_accuracy']:.1f}%, temperature 1 "
            f"{100 * summary['sampled_accuracy']:.1f}% on {summary['eval_examples']} test examples"
        )
    print(line)
