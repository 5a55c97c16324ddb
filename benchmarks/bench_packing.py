"""Padded vs packed vs prefix-shared update: one gradient accumulation, side by side (issue 16).

Builds one GRPO batch of P prompts x G samples with natural, ragged lengths (prompts and
completions of random length, random tokens: the arithmetic does not depend on the text) and
times `rlino.update.accumulate_gradients` on it with `optim.packing` none, pack and prefix,
interleaved so that a change in the machine's load hits every mode alike. Prints the tokens each
layout computes and the median time of each as a ratio to the padded one, as one JSON object.

    python benchmarks/bench_packing.py                       # the built-in tiny base, 1 thread
    python benchmarks/bench_packing.py --model PATH --threads 2 --prompts 8 --samples 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import ragged_batch

from rlino.methods import MethodParams, resolve
from rlino.update import MicroBatching, TokenBatch, accumulate_gradients, tokens_computed

MODES = ("none", "pack", "prefix")
TINY = Path(__file__).resolve().parent.parent / "rlino" / "assets" / "tiny-countdown"


def tokens_run(model: torch.nn.Module, batch: TokenBatch, cut: MicroBatching) -> dict[str, int]:
    """Tokens the layout puts through the model (padding or filler included) and micro-batches,
    as `rlino.update.tokens_computed` counts them over every row."""
    run, micros = tokens_computed(model, batch, torch.arange(len(batch)), cut)
    return {"tokens_run": run, "micro_batches": micros}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, time the three layouts, print and return the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(TINY), help="HF model directory (default: tiny base)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-lens", type=int, nargs=2, default=(30, 60), metavar=("LO", "HI"))
    ap.add_argument("--lens", type=int, nargs=2, default=(5, 120), metavar=("LO", "HI"))
    ap.add_argument("--micro-batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    vocab = model.config.get_text_config().vocab_size
    batch = ragged_batch(args.prompts, args.samples, vocab, args.prompt_lens, args.lens)
    method, params = resolve(MethodParams(name="grpo"))
    weights = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))
    rows = torch.arange(len(batch))
    cuts = {m: MicroBatching(64, args.micro_batch_tokens, m) for m in MODES}

    def run(cut: MicroBatching) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        accumulate_gradients(model, batch, method, params, weights, rows, rows, cut)
        return time.perf_counter() - start

    for cut in cuts.values():
        run(cut)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for m, cut in cuts.items():
            times[m].append(run(cut))
    base = statistics.median(times["none"])
    out: dict[str, Any] = {
        "model": Path(args.model).name,
        "threads": args.threads,
        "batch": f"{args.prompts} x {args.samples}",
        "real_tokens": int(batch.attn.sum()),
        "modes": {
            m: {
                **tokens_run(model, batch, cuts[m]),
                "median_s": round(statistics.median(times[m]), 4),
                "ratio_to_padded": round(statistics.median(times[m]) / base, 3),
            }
            for m in MODES
        },
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
