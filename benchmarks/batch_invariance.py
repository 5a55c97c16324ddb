"""Do N data-parallel ranks sample what one process samples? Count the completions that differ.

One process samples an iteration's P prompts as one batch; N ranks sample P/N each. With
per-prompt random streams (`rlino.rollout.prompt_seeds`) the draws are the same, so any
difference comes from arithmetic whose result depends on the batch shape (e.g. bf16 products
blocked differently for a different number of rows). This samples the task's first P test prompts
x G at T = 1 as one batch and as `--ranks` consecutive shards, and prints one JSON object: how many
completions differ and where the first differing token sits.

    python benchmarks/batch_invariance.py                                  # tiny base, fp32
    python benchmarks/batch_invariance.py --dtype bf16
    python benchmarks/batch_invariance.py --model SMOLLM2_DIR --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
        --task gsm8k --template chat --prompts 16 --samples 4 --max-new-tokens 64 --dtype bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from rlino.policy import load_policy
from rlino.rollout import Rollouts, SamplingConfig, generate, prompt_seeds
from rlino.tasks import get_task

TINY = Path(__file__).resolve().parent.parent / "rlino" / "assets" / "tiny-countdown"


def completions(r: Rollouts) -> list[list[int]]:
    """Each row's completion tokens, without padding."""
    return [ids[m].tolist() for ids, m in zip(r.completion_ids, r.completion_mask, strict=True)]


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where `a` and `b` differ (the shorter length if one is a prefix)."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Sample whole and sharded, compare, print and return the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(TINY))
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--template", default=None, help="prompt template (default: the task's)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    policy = load_policy(args.model, gguf_file=args.gguf_file, device="cpu", dtype=args.dtype)
    task = get_task(args.task)
    examples = task.examples("test")[: args.prompts]
    texts = [task.prompt(e, args.template, policy.tokenizer) for e in examples]
    prompts = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    seeds = prompt_seeds(0, range(len(prompts)))
    whole = completions(generate(policy, prompts, args.samples, config, seed=seeds))
    bounds = [round(i * len(prompts) / args.ranks) for i in range(args.ranks + 1)]
    sharded: list[list[int]] = []
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            shard = generate(policy, prompts[lo:hi], args.samples, config, seed=seeds[lo:hi])
            sharded += completions(shard)
    firsts = sorted(first_difference(a, b) for a, b in zip(whole, sharded, strict=True) if a != b)
    out: dict[str, Any] = {
        "model": Path(args.model).name,
        "dtype": args.dtype,
        "task": args.task,
        "prompts": len(prompts),
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "ranks": args.ranks,
        "completions": len(whole),
        "differ": len(firsts),
        "first_difference": (
            {"min": firsts[0], "median": firsts[len(firsts) // 2], "max": firsts[-1]}
            if firsts
            else None
        ),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
