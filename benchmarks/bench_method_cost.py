"""Seconds per training iteration: `fisft+-` (likelihood surrogate) vs `grpo` with beta 0.04 (issue 16).

The F-ISFT family with the likelihood surrogate needs neither old (sampling-time) log-probs nor a
reference model; GRPO with a KL term needs a frozen reference, and its clipped ratio needs the
old log-probs whenever a rollout batch takes more than one optimiser step. This script times
rlino's real training iteration (`rlino.step.step`, sample -> verify -> weigh -> update, then the
lr scheduler's step, as the training loop runs it) for two arms in one process:

- `grpo+kl`: method grpo, beta 0.04 (reference model loaded, KL term computed), clipped surrogate;
- `fisft+-`: method fisft+- with `method.surrogate=likelihood` (its default, written out).

Everything else is equal: the same model (default: the built-in tiny Countdown base), task,
dtype, P prompts x G samples, completion cap, seed, torch threads, optimiser settings (the tiny
preset's: AdamW lr 2e-4, minibatches of 64 samples, so the default 16 x 8 batch takes two
optimiser steps), evaluation and TensorBoard off. Both setups (each with its own optimiser) are
built first; then the iterations are interleaved, arm A's step i then arm B's step i, the order
alternating each iteration, so that a change in the machine's load hits both alike. The first
`--warmup` iterations are dropped and the medians of the rest are reported.

Iteration 0 samples the same completions in both arms (same weights, same seeds); after the
first update the two policies differ, so later rollouts (their lengths, rewards and filtered
groups) differ too. The update seconds therefore compare batches of the same shape and origin,
not identical batches; the sampled tokens of each arm are reported beside them. The frozen
log-prob passes each arm's update runs (old log-probs, reference log-probs) are counted and timed
by wrapping `rlino.update.frozen_logprobs`, which shows what the likelihood surrogate saves.
The rest of the update gap is the KL term's own: with a reference every sample runs through the
update's passes (the KL needs it), while without one the samples of all-equal groups (weight 0)
are skipped.

Prints a table to stderr and one JSON object on stdout: per arm the median iteration, rollout and
update seconds and sampled tokens; the ratios fisft+- / grpo+kl of iteration and update seconds;
the fraction of grpo+kl's iteration spent sampling (when sampling dominates, the whole-iteration
ratio cannot fall far below 1 whatever the update saves); the machine's load average at the start
and the end.

    python benchmarks/bench_method_cost.py                   # tiny base, 16 x 8 x 128, 1 thread
    python benchmarks/bench_method_cost.py --iters 5 --dtype bf16
    python benchmarks/bench_method_cost.py --model ~/models/SmolLM2-135M-Instruct --task gsm8k \\
        --prompts 4 --samples 8 --new-tokens 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import rlino.update
from rlino.config import TrainConfig, load_config
from rlino.errors import UserError
from rlino.run_metrics import peak_rss_gb
from rlino.setup import Setup, build, make_optimizer, make_scheduler
from rlino.step import step

NAME = "bench_method_cost"
ARMS: dict[str, dict[str, Any]] = {
    "grpo+kl": {"name": "grpo", "beta": 0.04},
    "fisft+-": {"name": "fisft+-", "surrogate": "likelihood"},
}
"""each arm's `method:` settings; everything else in the config is shared"""
GOAL = 0.6
"""issue 16: fisft+- seconds / grpo+kl seconds at most this"""
SERIES = ("iter_s", "rollout_s", "update_s", "sampled_tokens", "old_passes", "ref_passes")


@dataclass
class Arm:
    """One configuration under test: its setup, optimiser, schedule and measured iterations."""

    name: str
    setup: Setup
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rows: list[dict[str, Any]] = field(default_factory=list)
    """one per iteration, warm-up included"""


@dataclass
class FrozenPasses:
    """The frozen log-prob passes (`rlino.update.frozen_logprobs`) run while installed: the model
    each ran and its seconds."""

    calls: list[tuple[torch.nn.Module, float]] = field(default_factory=list)

    def split(self, setup: Setup) -> dict[str, Any]:
        """Passes on `setup`'s reference model vs on the policy (old log-probs), with seconds."""
        ref = setup.reference.model if setup.reference is not None else None
        refs = [s for m, s in self.calls if m is ref]
        olds = [s for m, s in self.calls if m is not ref]
        return {
            "old_passes": len(olds),
            "ref_passes": len(refs),
            "frozen_s": sum(olds) + sum(refs),
        }


@contextmanager
def counting_frozen_passes() -> Iterator[FrozenPasses]:
    """Wrap `rlino.update.frozen_logprobs` (which `update` looks up at call time) to record each
    call; restored on exit."""
    original = rlino.update.frozen_logprobs
    passes = FrozenPasses()

    def counted(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = original(model, *args, **kwargs)
        passes.calls.append((model, time.perf_counter() - start))
        return out

    rlino.update.frozen_logprobs = counted
    try:
        yield passes
    finally:
        rlino.update.frozen_logprobs = original


def arm_config(method: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    """The tiny preset's settings (the code defaults) with this arm's method and the CLI's shape."""
    return load_config(
        overrides={
            "model": {"path": args.model, "dtype": args.dtype, "device": "cpu"},
            "task": {"name": args.task},
            "method": method,
            "rollout": {
                "prompts_per_iter": args.prompts,
                "samples_per_prompt": args.samples,
                "max_new_tokens": args.new_tokens,
            },
            "optim": {"minibatch_size": args.minibatch},
            "eval": {"every": 0, "num_examples": 1},
            "seed": args.seed,
            "threads": args.threads,
            "tensorboard": False,
        }
    )


def build_arm(name: str, args: argparse.Namespace) -> Arm:
    """Config, setup, optimiser and scheduler of one arm; a one-line exit on a user mistake."""
    try:
        config = arm_config(ARMS[name], args)
        torch.manual_seed(config.seed)
        setup = build(config)
    except (UserError, OSError) as e:
        sys.exit(f"{NAME}: {e}")
    optimizer = make_optimizer(setup)
    return Arm(name, setup, optimizer, make_scheduler(optimizer, config))


def run_iteration(arm: Arm, iteration: int) -> dict[str, Any]:
    """One training iteration of `arm` (step + scheduler step, as the training loop does)."""
    with counting_frozen_passes() as passes:
        start = time.perf_counter()
        result = step(arm.setup, iteration, arm.optimizer)
        arm.scheduler.step()
        seconds = time.perf_counter() - start
    m = result.metrics
    return {
        "iter_s": seconds,
        "rollout_s": m["time/rollout_s"],
        "update_s": m["time/update_s"],
        "sampled_tokens": m["train/sampled_tokens"],
        "kl": m["optim/kl"],
        **passes.split(arm.setup),
    }


def summarise(arm: Arm, warmup: int) -> dict[str, Any]:
    """Medians over the measured iterations, the per-iteration series, and what the arm loads."""
    kept = arm.rows[warmup:]
    out: dict[str, Any] = {
        f"median_{key}": statistics.median(r[key] for r in kept) for key in SERIES
    }
    out["median_frozen_s"] = statistics.median(r["frozen_s"] for r in kept)
    out["reference_model"] = arm.setup.reference is not None
    out["surrogate"] = arm.setup.params.surrogate or arm.setup.method.surrogate
    out["beta"] = arm.setup.params.beta
    out["kl"] = [r["kl"] for r in kept]
    for key in ("iter_s", "rollout_s", "update_s"):
        out[key] = [round(r[key], 4) for r in kept]
    out["sampled_tokens"] = [r["sampled_tokens"] for r in kept]
    return out


def print_table(result: dict[str, Any]) -> None:
    """The medians per arm and the ratios, to stderr (stdout carries the JSON)."""
    err = sys.stderr
    print(
        f"{result['model']} on {result['task']}, {result['batch']}, {result['dtype']}, "
        f"{result['threads']} thread(s), {result['iters']} measured iteration(s)",
        file=err,
    )
    head = f"{'arm':<8} {'iter s':>8} {'rollout s':>10} {'update s':>9} {'frozen s':>9} "
    print(head + f"{'tokens':>7} {'old/ref passes':>15}", file=err)
    for name, a in result["arms"].items():
        passes = f"{a['median_old_passes']:g}/{a['median_ref_passes']:g}"
        print(
            f"{name:<8} {a['median_iter_s']:>8.3f} {a['median_rollout_s']:>10.3f} "
            f"{a['median_update_s']:>9.3f} {a['median_frozen_s']:>9.3f} "
            f"{a['median_sampled_tokens']:>7g} {passes:>15}",
            file=err,
        )
    r = result["ratios"]
    print(
        f"fisft+- / grpo+kl: iteration {r['iter_s']:.3f}x, update {r['update_s']:.3f}x "
        f"(goal <= {GOAL}x); grpo+kl spends {result['grpo_sampling_fraction']:.0%} of its "
        "iteration sampling",
        file=err,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the tiny base)")
    ap.add_argument("--task", choices=["countdown", "gsm8k"], default="countdown")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--prompts", type=int, default=16, help="P prompts per iteration")
    ap.add_argument("--samples", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="completion cap")
    ap.add_argument(
        "--minibatch", type=int, default=64, help="samples per optimiser step (the preset's 64)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3, help="measured iterations")
    ap.add_argument("--warmup", type=int, default=1, help="iterations dropped first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --iters >= 1, --warmup >= 0, --threads >= 1")
    if min(args.prompts, args.samples, args.new_tokens, args.minibatch) < 1:
        ap.error("need --prompts, --samples, --new-tokens and --minibatch >= 1")
    if args.model is not None and not Path(args.model).expanduser().is_dir():
        sys.exit(f"{NAME}: --model {args.model!r} is not a directory")
    if args.model is not None:
        args.model = str(Path(args.model).expanduser())
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build both arms, time them interleaved, print the table and the JSON; return the JSON."""
    args = parse_args(argv)
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    arms = [build_arm(name, args) for name in ARMS]
    for i in range(args.warmup + args.iters):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            row = run_iteration(arm, i)
            arm.rows.append(row)
            tag = "warm-up" if i < args.warmup else "measured"
            print(
                f"{arm.name} iteration {i} ({tag}): {row['iter_s']:.3f} s (rollout "
                f"{row['rollout_s']:.3f}, update {row['update_s']:.3f}, "
                f"{row['sampled_tokens']} tokens)",
                file=sys.stderr,
                flush=True,
            )
    summary = {arm.name: summarise(arm, args.warmup) for arm in arms}
    grpo, fisft = summary["grpo+kl"], summary["fisft+-"]
    ratios = {key: fisft[f"median_{key}"] / grpo[f"median_{key}"] for key in ("iter_s", "update_s")}
    model = arms[0].setup.config.model.path
    result: dict[str, Any] = {
        "benchmark": NAME,
        "model": Path(model).name if model else "tiny-countdown (built-in)",
        "task": args.task,
        "dtype": args.dtype,
        "threads": args.threads,
        "batch": f"{args.prompts} x {args.samples} x {args.new_tokens}",
        "minibatch": args.minibatch,
        "iters": args.iters,
        "warmup": args.warmup,
        "arms": summary,
        "ratios": ratios,
        "goal": GOAL,
        "goal_met": {key: value <= GOAL for key, value in ratios.items()},
        "grpo_sampling_fraction": grpo["median_rollout_s"] / grpo["median_iter_s"],
        "peak_rss_gb": peak_rss_gb(),
        "machine": {
            "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "dtype": args.dtype,
            "model": model or "tiny-countdown (built-in)",
        },
    }
    print_table(result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
