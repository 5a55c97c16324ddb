"""How much of this machine's matmul rate a GRPO iteration's phases reach (issue 16).

Seconds per iteration say which framework is faster, not how far either is from what the machine
can do. This module measures, in the same run and at the benchmark's thread count and dtype, the
rate of the matrix products themselves, and sets each phase's achieved model FLOP/s against it:

- the square rate: one 2048 x 2048 @ 2048 x 2048 product, the best case for the BLAS library;
- the phase-shape rates: the products the phase's own matmuls make, for every distinct weight
  matrix (out x in) of the model, weighted by how often each occurs in the model.
  decode (sampling): (rows x in) @ (in x out), the forward product only, with `rows` = the
  sampling batch (P*G rows at the start of decoding);
  update: (rows x in) @ (in x out) forward, then both backward products, grad input
  (rows x out) @ (out x in) and grad weight (in x rows) @ (rows x out), with `rows` = the tokens
  of one micro-batch.

Achieved model FLOP/s: sampling 2 x N x sampled tokens / sampling seconds, update
6 x N x trained tokens / update seconds, with N from `flop_params` (see there). These are model
FLOPs, the work a plain padding-free implementation needs for those tokens: attention's score
products, the prompt's prefill during sampling, padding and recomputation are left out. Trained
tokens are the real prompt and completion tokens of the rows the update differentiates, each row
with its own prompt, so a layout that does less than that (rlino's `optim.packing=prefix` runs a
shared prompt once) can show a higher figure than the hardware did.

Each product is timed for about `seconds` (one warm-up call, then the median of `runs` runs of
as many calls as fit), on random operands in the given dtype, as plain torch calls
(`F.linear`, `torch.mm`). rlino's bf16 sampler prepacks its weights for oneDNN, which these calls
do not, so its decode may beat the decode rate measured here.

    python benchmarks/bench_util.py --model DIR --dtype bf16 --rows 64            # prints JSON
    python benchmarks/bench_util.py --model DIR --rows 64 --update-rows 1024 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SQUARE = 2048
"""side of the square product that gives the machine's best-case rate"""
PHASE_PASSES = {"decode": 2, "update": 6}
"""model FLOPs per parameter per token: forward only (2), forward and backward (6)"""
PHASE_OPS = {"decode": ("forward",), "update": ("forward", "grad_input", "grad_weight")}
"""the products each phase makes with one weight matrix"""


@dataclass(frozen=True)
class Product:
    """One matrix product of a layer with an (out x in) weight over `rows` rows, or the square.

    forward: (rows x in) @ (in x out), as `F.linear` computes it with the stored (out x in)
    weight; grad_input: (rows x out) @ (out x in); grad_weight: (in x rows) @ (rows x out);
    square: (rows x in) @ (in x out) on plain contiguous matrices. Every kind costs
    2 x rows x in x out FLOPs.
    """

    op: str
    rows: int
    d_in: int
    d_out: int

    @property
    def flops(self) -> int:
        """Multiply-adds x 2."""
        return 2 * self.rows * self.d_in * self.d_out


def weight_shapes(model: Any) -> dict[tuple[int, int], int]:
    """The model's matmul weights as {(out, in): how many}: every `nn.Linear`, the lm head included.

    The lm head is an `nn.Linear` whose weight may be the input embedding's (tied); it is a real
    product per token either way, so it is listed once. The input embedding is a lookup and makes
    no product.
    """
    import torch

    counts: Counter[tuple[int, int]] = Counter()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            counts[(int(out_features), int(in_features))] += 1
    return dict(sorted(counts.items()))


def flop_params(model: Any) -> int:
    """N of the 2N / 6N FLOPs per token: the non-embedding parameters plus the lm head.

    Why: the input embedding is a table lookup, so its parameters cost no FLOPs, while the lm
    head is a (vocabulary x hidden) product per token whether or not its weight is tied to the
    embedding (for SmolLM2-135M, 28M of the 135M parameters). So every parameter counts except
    the input token embedding's, and a tied head is counted once as the head. Norm weights and
    biases are counted too (a rounding error next to the matrices).
    """
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    total -= embedding.numel()
    if head is not None and head.weight is embedding:
        total += head.weight.numel()
    return int(total)


def phase_products(shape: tuple[int, int], rows: int, phase: str) -> list[Product]:
    """The products of `phase` (decode or update) with one (out, in) weight over `rows` rows."""
    d_out, d_in = shape
    return [Product(op, rows, d_in, d_out) for op in PHASE_OPS[phase]]


def mix_rate(
    shapes: Mapping[tuple[int, int], int],
    rows: int,
    phase: str,
    seconds: Mapping[Product, float],
) -> float:
    """FLOP/s of the phase's whole product mix: every weight's products, each shape as often as
    the model has it, all FLOPs over all the time they take (`seconds`: per call of each)."""
    flops = 0.0
    spent = 0.0
    for shape, count in shapes.items():
        for product in phase_products(shape, rows, phase):
            flops += count * product.flops
            spent += count * seconds[product]
    return flops / spent


def achieved(passes: int, params: int, tokens: float, seconds: float) -> float:
    """Model FLOP/s of a phase: passes (2 or 6) x params x tokens / seconds."""
    return passes * params * tokens / seconds


def phase_utilisation(
    phase: str,
    params: int,
    tokens: float,
    seconds: float,
    square_rate: float,
    phase_rate: float,
) -> dict[str, float | None]:
    """A phase's achieved model FLOP/s and its fractions of the square and phase-shape rates.

    `phase` decode counts 2 FLOPs per parameter per token (sampled tokens), update 6 (trained
    tokens). No seconds (a phase that did not run, or was not timed) gives None throughout.
    """
    if seconds <= 0:
        return {"model_flop_per_s": None, "of_square": None, "of_phase_shapes": None}
    rate = achieved(PHASE_PASSES[phase], params, tokens, seconds)
    return {
        "model_flop_per_s": rate,
        "of_square": rate / square_rate,
        "of_phase_shapes": rate / phase_rate,
    }


# ---------------------------------------------------------------- timing


def seconds_per_call(fn: Callable[[], object], budget_s: float, runs: int = 5) -> float:
    """Median seconds of one `fn()` over `runs` runs filling about `budget_s` (after a warm-up)."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-9)
    calls = max(1, int(budget_s / runs / once))
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def time_product(product: Product, dtype: Any, budget_s: float, runs: int = 5) -> float:
    """Seconds per call of `product` on random operands of `dtype`, laid out as a layer has them."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    rows, d_in, d_out = product.rows, product.d_in, product.d_out
    if product.op == "forward":
        x, w = rand(rows, d_in), rand(d_out, d_in)

        def fn() -> object:
            return torch.nn.functional.linear(x, w)

    elif product.op == "grad_input":
        g, w = rand(rows, d_out), rand(d_out, d_in)

        def fn() -> object:
            return torch.mm(g, w)

    elif product.op == "grad_weight":
        x, g = rand(rows, d_in), rand(rows, d_out)

        def fn() -> object:
            return torch.mm(x.t(), g)

    elif product.op == "square":
        a, b = rand(rows, d_in), rand(d_in, d_out)

        def fn() -> object:
            return torch.mm(a, b)

    else:
        raise ValueError(f"unknown product {product.op!r}")
    with torch.inference_mode():
        return seconds_per_call(fn, budget_s, runs)


def model_skeleton(model_dir: Path) -> Any:
    """The model of `model_dir` built on the meta device: its shapes, no weights read or held."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def measure(
    model_dir: Path,
    dtype: str,
    decode_rows: int,
    update_rows: int,
    seconds: float = 2.0,
    runs: int = 5,
) -> dict[str, Any]:
    """The square rate and the decode and update phase-shape rates of the model in `model_dir`.

    `dtype` fp32 or bf16 (the benchmark's compute precision); `seconds` per distinct product.
    Returns plain JSON data: the rates in FLOP/s, the products timed, N (`flop_params`).
    """
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = model_skeleton(model_dir)
    shapes = weight_shapes(model)
    params = flop_params(model)
    square = Product("square", SQUARE, SQUARE, SQUARE)
    rows_of = {"decode": decode_rows, "update": update_rows}
    wanted: list[Product] = [square]
    for phase, rows in rows_of.items():
        for shape in shapes:
            wanted += [p for p in phase_products(shape, rows, phase) if p not in wanted]
    timed = {p: time_product(p, torch_dtype, seconds, runs) for p in wanted}
    out: dict[str, Any] = {
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "flop_params": params,
        "weight_shapes": [[out_f, in_f, n] for (out_f, in_f), n in shapes.items()],
        "square_flop_per_s": square.flops / timed[square],
    }
    for phase, rows in rows_of.items():
        out[f"{phase}_rows"] = rows
        out[f"{phase}_flop_per_s"] = mix_rate(shapes, rows, phase, timed)
    out["products"] = [
        {**vars(p), "seconds": timed[p], "flop_per_s": p.flops / timed[p]} for p in wanted
    ]
    return out


def fractions(
    rates: Mapping[str, Any], phases: Iterable[tuple[str, float, float]]
) -> dict[str, dict[str, Any]]:
    """Utilisation of each (phase, tokens, seconds) against `measure`'s `rates`."""
    return {
        phase: {
            "tokens": tokens,
            "seconds": seconds,
            **phase_utilisation(
                phase,
                rates["flop_params"],
                tokens,
                seconds,
                rates["square_flop_per_s"],
                rates[f"{phase}_flop_per_s"],
            ),
        }
        for phase, tokens, seconds in phases
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, measure, print one line of JSON and return it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="HF model directory (config.json)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rows", type=int, default=64, help="decode rows (the sampling batch)")
    p.add_argument("--update-rows", type=int, default=512, help="tokens of one update micro-batch")
    p.add_argument("--seconds", type=float, default=2.0, help="time spent on each product")
    p.add_argument("--runs", type=int, default=5, help="runs per product (median)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    if min(args.rows, args.update_rows, args.runs, args.threads) < 1 or args.seconds <= 0:
        p.error("need --rows, --update-rows, --runs, --threads >= 1 and --seconds > 0")
    import torch

    torch.set_num_threads(args.threads)
    out = measure(args.model, args.dtype, args.rows, args.update_rows, args.seconds, args.runs)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
