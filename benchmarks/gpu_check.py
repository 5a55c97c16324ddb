"""Check and measure rlino on a GPU machine in one command; one JSON object on stdout.

Made for a lent GPU machine with PyTorch (CUDA), transformers, accelerate, safetensors, numpy,
pytest, typer and rich, but no `datasets`, `gguf` or vLLM, no network, and rlino not installed:
the script puts the repository root on sys.path itself (and on PYTHONPATH for its children), and
every model is randomly initialised here, so nothing is downloaded. Sections, each in its own
subprocess with a hard time limit (a hang or a CUDA error in one cannot take the others down, and
whatever a section measured before it failed is kept beside its "error"):

- `model`: a random model of Qwen2.5-0.5B's shape (Qwen2, hidden 896, 24 layers, 14 heads, 2 KV
  heads, MLP 4864, vocabulary 151,936, tied embeddings) saved in bf16 to a temporary directory.
  Its tokenizer is rlino's built-in tiny Countdown one (1,460 ids, all below 151,936, so every
  prompt is valid input; sampled ids beyond it decode to nothing). transformers 5 swaps the
  tokenizer of a `qwen2` directory for its own Qwen2Tokenizer, which encodes differently, so the
  sections put the tiny tokenizer object back in after loading.
- `device`: the accelerator, and its bf16 matmul rate (8192^3 products: 3 warm-ups, mean of 10),
  the peak that `grpo_step`'s model-FLOP utilisation is measured against.
- `tests`: the CUDA tests of tests/test_gpu_check.py (`-k cuda`: built-in greedy sampler = HF
  greedy in bf16, token log-probs on the device = CPU fp32, one GRPO step with finite metrics),
  run by pytest on `--device` (environment variable RLINO_TEST_DEVICE); pass/fail/skip counts.
- `rollout`: tokens/s of rlino's built-in sampler vs HF `generate` on the random model in bf16,
  same random-id prompts (16-32 tokens, left-padded), one sample per prompt, temperature 1, EOS
  ignored by both so every row makes exactly `new_tokens` tokens; median of up to 3 repeats per
  side, timed back to back after a short warm-up, at batch 64 and 256.
- `grpo_step`: `rlino.step.step` (sample, verify, weigh, update) for the preset
  `qwen2.5-0.5-countdown` (GRPO, beta 0.001, bf16 compute with fp32 master weights) with the
  built-in sampler, 16 prompts x 8 samples x 256 new tokens (EOS ignored) and one optimiser step;
  iteration 0 warms up, iteration 1 is reported. Wall time split into rollout and update, peak
  `torch.cuda.max_memory_allocated`, and model-FLOP utilisation against the `device` rate. With a
  random model every Countdown reward is 0, so every group is filtered (weight 0); the KL term
  (beta > 0) still runs every row through the update's forward and backward, so the update does
  the full work of a real iteration. FLOPs count matmuls only (attention scores, a few % at these
  lengths, are left out): 2 FLOPs per parameter per token forward, 6 forward+backward, the
  transformer body on every prompt and completion token, the LM head (vocab x hidden) only where
  logits are computed (sampled tokens; the update's completion positions). `mfu_issue_formula`
  is the cruder (6 N x trained completion tokens + 2 N x sampled tokens) / time with N all
  parameters.
- `fsdp`: `fully_shard` on the random model on a one-rank NCCL (gloo on CPU) process group, one
  bf16 forward/backward: ok or the error.
- `cpu_tests`: the existing tests of device/dtype code (test_precision, test_rollout,
  test_logprobs, test_policy, test_step; not the slow ones) on this machine's CPU with its
  library versions: pass/fail counts.

`--small` shrinks everything (a 2-layer hidden-64 Qwen2, batch 4, 8 tokens) so the script runs on
a CPU (`--small --device cpu`, as tests/test_gpu_check.py does; 2-3 minutes on 2 busy cores, most
of it starting Python processes). The full run is
sized to finish in under 8 minutes on one H200: every section has a time limit, and the run stops
starting sections at `--deadline` seconds.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --small --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
SECTIONS = ("model", "device", "tests", "rollout", "grpo_step", "fsdp", "cpu_tests")
NEEDS_MODEL = ("rollout", "grpo_step", "fsdp")
"""the sections that load the random model the section `model` saves"""
RUNTIME_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "datasets",
    "gguf",
    "accelerate",
    "typer",
    "rich",
    "yaml",
    "matplotlib",
    "tensorboard",
    "numpy",
    "peft",
    "pytest",
    "vllm",
)
"""rlino's runtime dependencies (pyproject.toml) and what this script uses, by import name."""
CPU_TEST_FILES = (
    "tests/test_precision.py",
    "tests/test_rollout.py",
    "tests/test_logprobs.py",
    "tests/test_policy.py",
    "tests/test_step.py",
)
"""the existing tests of device and dtype code (CPU-only tests: run here for the library versions)"""


@dataclass(frozen=True)
class Shape:
    """What the sections run: the model's shape, batches, lengths and time limits."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    rollout_batches: tuple[int, ...]
    """batch sizes of the rollout comparison (one sample per prompt)"""
    rollout_new_tokens: int
    rollout_repeats: int
    """timed repeats per side and batch (fewer when the section's budget runs short)"""
    step_prompts: int
    step_samples: int
    step_new_tokens: int
    matmul_n: int
    """side of the square bf16 matmul that measures the peak rate"""
    limits: dict[str, int]
    """seconds each section may run (hard limit on its subprocess)"""


FULL = Shape(
    hidden=896,
    layers=24,
    heads=14,
    kv_heads=2,
    intermediate=4864,
    vocab=151936,
    max_positions=32768,
    rollout_batches=(64, 256),
    rollout_new_tokens=256,
    rollout_repeats=3,
    step_prompts=16,
    step_samples=8,
    step_new_tokens=256,
    matmul_n=8192,
    limits={
        "model": 90,
        "device": 60,
        "tests": 90,
        "rollout": 170,
        "grpo_step": 120,
        "fsdp": 120,
        "cpu_tests": 120,
    },
)
SMALL = Shape(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab=2048,
    max_positions=1024,
    rollout_batches=(4,),
    rollout_new_tokens=8,
    rollout_repeats=1,
    step_prompts=2,
    step_samples=2,
    step_new_tokens=8,
    matmul_n=256,
    limits={
        "model": 60,
        "device": 60,
        "tests": 120,
        "rollout": 60,
        "grpo_step": 90,
        "fsdp": 60,
        "cpu_tests": 300,
    },
)


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the JSON)."""
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def ensure_rlino_importable() -> None:
    """Put this repository's root first on sys.path: rlino is not installed on the GPU machine,
    and where it is (an editable install elsewhere), this checkout is the one to check."""
    if sys.path[:1] != [str(REPO)]:
        sys.path.insert(0, str(REPO))


def child_env(device: str) -> dict[str, str]:
    """Environment of every subprocess: rlino importable, offline, quiet progress bars."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
        "RLINO_TEST_DEVICE": device,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }


def finite_or_none(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become None (JSON has no literal for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (rates span CPU GFLOP/s to GPU PFLOP/s)."""
    return float(f"{x:.{digits}g}")


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a worker's (possibly partial) result atomically, so a killed worker leaves valid JSON."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------- shared model helpers


def tiny_tokenizer() -> Any:
    """rlino's built-in tiny Countdown tokenizer, left padding (the random model's tokenizer)."""
    from transformers import AutoTokenizer

    from rlino.resolve import tiny_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    tokenizer.padding_side = "left"
    return tokenizer


def qwen_config(shape: Shape, tokenizer: Any) -> Any:
    """A Qwen2 config of `shape` (FULL: Qwen2.5-0.5B's), special ids from the tiny tokenizer."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def param_split(model: Any) -> dict[str, int]:
    """Parameter counts: all (a tied matrix once), the LM head (vocab x hidden), the rest (body).

    The body does 2 FLOPs per parameter per token forward on every token; the head only where
    logits are computed; the input embedding is a lookup (no FLOPs) and, when tied, the head itself.
    """
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    tied = head is embed
    body = total - head.numel() - (0 if tied else embed.numel())
    return {"params": total, "head_params": head.numel(), "body_params": body, "tied": tied}


def sync(device: Any) -> None:
    """Wait for queued kernels, so wall-clock times cover the work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- workers (one per subprocess)


def worker_model(args: argparse.Namespace, shape: Shape, result: dict[str, Any]) -> None:
    """Build the random model (initialised on the device: seconds on a GPU, not a minute on the
    CPU) and save it, bf16 safetensors + tiny tokenizer."""
    import torch
    from transformers import Qwen2ForCausalLM

    t0 = time.perf_counter()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(qwen_config(shape, tokenizer))
    result.update(param_split(model))
    model.to(torch.bfloat16).save_pretrained(args.model_dir)
    tokenizer.save_pretrained(args.model_dir)
    result.update(
        shape={k: v for k, v in asdict(shape).items() if k != "limits"},
        tokenizer=f"rlino tiny-countdown ({len(tokenizer)} ids < vocab {shape.vocab})",
        build_s=round(time.perf_counter() - t0, 2),
    )


def worker_device(args: argparse.Namespace, shape: Shape, result: dict[str, Any]) -> None:
    """The device's name and memory, and its bf16 matmul rate: 3 warm-ups, then mean of 10."""
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gb=round(props.total_memory / 2**30, 1),
        )
    else:
        result.update(name="cpu", threads=torch.get_num_threads())
    n = shape.matmul_n
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    mean = statistics.fmean(times)
    result.update(
        matmul_n=n,
        matmul_ms=round(mean * 1e3, 3),
        bf16_matmul_tflops=sig(2 * n**3 / mean / 1e12),
    )


def worker_rollout(args: argparse.Namespace, shape: Shape, result: dict[str, Any]) -> None:
    """Tokens/s of the built-in sampler vs HF generate, back to back, per batch size."""
    import torch
    from bench_rollout import prompts_for, run_hf, run_ours
    from transformers import AutoModelForCausalLM

    from rlino.policy import Policy

    start = time.perf_counter()
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
    model = model.to(device).eval()
    policy = Policy(model, tiny_tokenizer(), device, torch.bfloat16, str(args.model_dir))
    new_tokens = shape.rollout_new_tokens
    sides: dict[str, Callable[..., int]] = {"rlino": run_ours, "hf": run_hf}
    result.update(dtype="bf16", new_tokens=new_tokens, batches=[])
    write_result(args.result, result)
    for batch in shape.rollout_batches:
        prompts = prompts_for(policy, "tiny", batch)  # random ids, lengths 16-32
        for fn in sides.values():  # warm-up: first-call allocations, lazy inits
            fn(policy, prompts, 4, 0)
        times: dict[str, list[float]] = {"rlino": [], "hf": []}
        for rep in range(shape.rollout_repeats):
            for label, fn in sides.items():
                sync(device)
                t0 = time.perf_counter()
                tokens = fn(policy, prompts, new_tokens, rep)
                sync(device)
                times[label].append(time.perf_counter() - t0)
                if tokens != batch * new_tokens:
                    raise RuntimeError(f"{label} made {tokens} tokens, not {batch * new_tokens}")
            spent = time.perf_counter() - start
            per_rep = sum(t[-1] for t in times.values())
            if spent + 1.5 * per_rep > args.budget:
                break  # keep what is measured rather than lose the section to its time limit
        ours = batch * new_tokens / statistics.median(times["rlino"])
        hf = batch * new_tokens / statistics.median(times["hf"])
        row = {
            "batch": batch,
            "repeats": len(times["rlino"]),
            "rlino_tok_s": round(ours, 1),
            "hf_tok_s": round(hf, 1),
            "ratio": round(ours / hf, 3),
            "rlino_s": [round(t, 3) for t in times["rlino"]],
            "hf_s": [round(t, 3) for t in times["hf"]],
        }
        result["batches"].append(row)
        write_result(args.result, result)
        log(f"rollout batch {batch}: rlino {ours:.0f} tok/s, hf {hf:.0f} tok/s")


def step_tokens(setup: Any, result: Any) -> dict[str, int]:
    """Tokens of one step: prompt, sampled, and those the update's passes run.

    The update runs the rows with a nonzero weight, or every row when a KL reference is in use
    (then the reference also runs a forward over every row); an extra no-grad forward over every
    row gives the old log-probs when the clipped surrogate needs them (mu > 1 or minibatches).
    """
    r = result.scored.rollouts
    prompt_len = r.prompt_mask.sum(dim=1)  # (N,)
    completion_len = r.completion_mask.sum(dim=1)  # (N,)
    w = result.weights
    per_token = w.shape == r.completion_mask.shape
    has_weight = (w != 0).any(dim=1) if per_token else w.reshape(-1) != 0  # (N,)
    run = has_weight | (setup.reference is not None)
    params, optim = setup.params, setup.config.optim
    clipped = (params.surrogate or setup.method.surrogate) == "clipped"
    needs_old = clipped and (params.mu > 1 or optim.minibatch_size < len(prompt_len))
    extra_forwards = int(setup.reference is not None) + int(needs_old)
    return {
        "prompt_tokens": int(prompt_len.sum()),
        "sampled_tokens": int(completion_len.sum()),
        "rows": len(prompt_len),
        "trained_rows": int(run.sum()),
        "trained_seq_tokens": int((prompt_len + completion_len)[run].sum()),
        "trained_completion_tokens": int(completion_len[run].sum()),
        "extra_forward_seq_tokens": extra_forwards * int((prompt_len + completion_len).sum()),
        "extra_forward_completion_tokens": extra_forwards * int(completion_len.sum()),
        "mu_passes": params.mu,
    }


def step_flops(tokens: dict[str, int], split: dict[str, int]) -> dict[str, float]:
    """Matmul FLOPs of the rollout and of the update (see the module docstring)."""
    body, head = split["body_params"], split["head_params"]
    rollout = 2 * body * (tokens["prompt_tokens"] + tokens["sampled_tokens"])
    rollout += 2 * head * tokens["sampled_tokens"]
    update = tokens["mu_passes"] * (
        6 * body * tokens["trained_seq_tokens"] + 6 * head * tokens["trained_completion_tokens"]
    )
    update += 2 * body * tokens["extra_forward_seq_tokens"]
    update += 2 * head * tokens["extra_forward_completion_tokens"]
    simple = split["params"] * (
        6 * tokens["mu_passes"] * tokens["trained_completion_tokens"] + 2 * tokens["sampled_tokens"]
    )
    return {"rollout_flops": rollout, "update_flops": update, "issue_formula_flops": simple}


def grpo_config(args: argparse.Namespace, shape: Shape, strategy: str = "ddp") -> Any:
    """The GRPO config both step sections run: the Qwen2.5-0.5B preset on the random model."""
    from rlino.config import load_config

    n = shape.step_prompts * shape.step_samples
    return load_config(
        "qwen2.5-0.5-countdown",
        {
            "model": {"path": str(args.model_dir), "device": args.device, "dtype": "bf16"},
            "task": {"options": {"train_size": max(64, 4 * shape.step_prompts), "test_size": 8}},
            "rollout": {
                "backend": "builtin",
                "prompts_per_iter": shape.step_prompts,
                "samples_per_prompt": shape.step_samples,
                "max_new_tokens": shape.step_new_tokens,
                "ignore_eos": True,  # fixed lengths: the same work in every run
            },
            "optim": {"minibatch_size": n},  # one optimiser step on all P*G samples
            "eval": {"every": 0, "num_examples": 1},
            "iterations": 2,
            "tensorboard": False,
            "dist": {"strategy": strategy},
        },
    )


def worker_grpo_step(args: argparse.Namespace, shape: Shape, result: dict[str, Any]) -> None:
    """One warm-up and one measured `rlino.step.step` of GRPO on the random model."""
    import torch

    from rlino.setup import build, make_optimizer
    from rlino.step import step

    start = time.perf_counter()
    device = torch.device(args.device)
    preset = "qwen2.5-0.5-countdown"
    config = grpo_config(args, shape)
    o = config.optim
    result.update(
        preset=preset,
        shape=f"{shape.step_prompts} prompts x {shape.step_samples} samples x "
        f"{shape.step_new_tokens} new tokens",
        method=f"{config.method.name} beta {config.method.beta}",
        dtype=f"{config.model.dtype} compute, {config.model.master_dtype} master",
        micro_batching=f"micro_batch_size {o.micro_batch_size}, micro_batch_tokens "
        f"{o.micro_batch_tokens}, minibatch_size {o.minibatch_size}",
    )
    setup = build(config)
    tokenizer = tiny_tokenizer()  # in place of the Qwen2Tokenizer transformers substituted
    for policy in (setup.policy, setup.compute_policy, setup.reference):
        if policy is not None:
            policy.tokenizer = tokenizer
    optimizer = make_optimizer(setup)
    split = param_split(setup.policy.model)
    result.update(split, build_s=round(time.perf_counter() - start, 2))
    if device.type == "cuda":
        result["mem_after_build_gb"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    write_result(args.result, result)
    for iteration in range(2):
        sync(device)
        t0 = time.perf_counter()
        out = step(setup, iteration, optimizer)
        sync(device)
        wall = time.perf_counter() - t0
        m = out.metrics
        tokens = step_tokens(setup, out)
        row = {
            "iteration": iteration,
            "wall_s": round(wall, 3),
            "rollout_s": round(m["time/rollout_s"], 3),
            "update_s": round(wall - m["time/rollout_s"], 3),  # synchronised, unlike time/update_s
            **tokens,
            **step_flops(tokens, split),
            "reward_mean": m["train/reward_mean"],
            "groups_filtered": m["train/groups_filtered"],
            "loss_total": finite_or_none(m["loss/total"]),
            "grad_norm": finite_or_none(m["optim/grad_norm"]),
            "metrics_finite": all(
                math.isfinite(v) for v in m.values() if isinstance(v, int | float)
            ),
        }
        if device.type == "cuda":
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if iteration == 0:  # the warm-up: lazy inits, allocator growth, kernel selection
            result["warmup"] = {k: row[k] for k in ("wall_s", "rollout_s", "update_s")}
        else:
            result["measured"] = row
        write_result(args.result, result)
        log(f"grpo step {iteration}: {wall:.2f} s (rollout {row['rollout_s']:.2f} s)")
        if time.perf_counter() - start + 1.5 * wall > args.budget:
            result["measured"] = row  # no time for a second iteration: report the first
            result["note"] = "only the warm-up iteration fitted the time limit"
            break


def worker_fsdp(args: argparse.Namespace, shape: Shape, result: dict[str, Any]) -> None:
    """rlino's `dist.strategy: fsdp` on a one-rank mesh (FSDP2 with bf16 compute, fp32 master):
    two GRPO iterations of the random model through `rlino.step.step`, and the whole-weight
    gather a checkpoint makes."""
    import torch

    from rlino import fsdp
    from rlino.distributed import init_world
    from rlino.setup import build, make_optimizer
    from rlino.step import step

    device = torch.device(args.device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    t0 = time.perf_counter()
    world = init_world(args.device, "fsdp")
    try:
        setup = build(grpo_config(args, shape, "fsdp"), world=world)
        tokenizer = tiny_tokenizer()  # in place of the Qwen2Tokenizer transformers substituted
        for policy in (setup.policy, setup.reference):
            if policy is not None:
                policy.tokenizer = tokenizer
        result.update(sharded=fsdp.is_sharded(setup.policy.model), world=world.size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        optimizer = make_optimizer(setup)
        for iteration in range(2):
            sync(device)
            t1 = time.perf_counter()
            m = step(setup, iteration, optimizer).metrics
            sync(device)
            result[f"iteration_{iteration}"] = {
                "wall_s": round(time.perf_counter() - t1, 3),
                "rollout_s": round(m["time/rollout_s"], 3),
                "grad_norm": finite_or_none(m["optim/grad_norm"]),
                "metrics_finite": all(
                    math.isfinite(v) for v in m.values() if isinstance(v, int | float)
                ),
            }
            write_result(args.result, result)
        state = fsdp.full_model_state(setup.policy.model)
        result.update(
            gathered_tensors=len(state),
            gathered_finite=all(bool(torch.isfinite(t.float()).all()) for t in state.values()),
            seconds=round(time.perf_counter() - t0, 2),
        )
        if device.type == "cuda":
            result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["ok"] = result["gathered_finite"] and all(
            result[f"iteration_{i}"]["metrics_finite"] for i in range(2)
        )
    finally:
        torch.distributed.destroy_process_group()


WORKERS: dict[str, Callable[[argparse.Namespace, Shape, dict[str, Any]], None]] = {
    "model": worker_model,
    "device": worker_device,
    "rollout": worker_rollout,
    "grpo_step": worker_grpo_step,
    "fsdp": worker_fsdp,
}


def worker_main(args: argparse.Namespace) -> None:
    """Run one section; its result (or its error, with what it had measured) goes to --result."""
    shape = SMALL if args.small else FULL
    result: dict[str, Any] = {}
    try:
        WORKERS[args.worker](args, shape, result)
    except BaseException as err:  # reported with what was measured; the parent carries on
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc(limit=8)[-3000:]
    write_result(args.result, result)


# ---------------------------------------------------------------- parent


def run_worker(name: str, args: argparse.Namespace, model_dir: Path, limit: float) -> dict:
    """Run worker `name` in a subprocess for at most `limit` s; its result, or why there is none."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--worker",
            name,
            "--device",
            args.device,
            "--model-dir",
            str(model_dir),
            "--result",
            str(result_path),
            "--budget",
            str(int(limit * 0.85)),
            *(["--small"] if args.small else []),
        ]
        error = None
        try:
            proc = subprocess.run(
                cmd, env=child_env(args.device), stdout=sys.stderr, timeout=limit, check=False
            )
            if proc.returncode != 0:
                error = f"worker exited with code {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {limit:.0f} s (time limit of this section)"
        result: dict[str, Any] = {}
        if result_path.is_file():
            try:
                result = json.loads(result_path.read_text())
            except json.JSONDecodeError:
                error = error or "worker wrote unreadable JSON"
        elif error is None:
            error = "worker wrote no result"
        if error:
            result["error"] = result.get("error", error)
        return result


def run_pytest(selection: list[str], args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """Run pytest on `selection` in a subprocess; counts and the failures, from its JUnit XML."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-pytest-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            *selection,
        ]
        result: dict[str, Any] = {"selection": " ".join(selection), "device": args.device}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=child_env(args.device),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=limit,
                check=False,
            )
            result["exit_code"] = proc.returncode
            tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
            result["summary"] = tail[0] if tail else ""
        except subprocess.TimeoutExpired as err:
            result["error"] = f"timed out after {limit:.0f} s (time limit of this section)"
            partial = err.output.decode(errors="replace") if isinstance(err.output, bytes) else ""
            result["output_tail"] = (partial or str(err.output or ""))[-1500:]
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if xml.is_file():
            result.update(junit_counts(xml))
        elif "error" not in result:
            result["error"] = "pytest wrote no JUnit report"
        failed = result.get("failed") or result.get("errors")
        if result.get("exit_code") not in (None, 0) and "error" not in result and not failed:
            result["error"] = f"pytest exited with code {result['exit_code']}"
        return result


def junit_counts(path: Path) -> dict[str, Any]:
    """passed/failed/errors/skipped and the first lines of each failure, from a JUnit XML file."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[dict[str, str]] = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "errors"}.get(outcome, outcome)
        counts[key] += 1
        if outcome in ("failure", "error"):
            node = case.find(outcome)
            message = (node.get("message") or node.text or "") if node is not None else ""
            failures.append({"test": name, "message": message[:400]})
    return {**counts, "failures": failures[:20]}  # the first 20: the JSON stays readable


def env_info(device: str) -> dict[str, Any]:
    """Python and package versions; which of rlino's runtime dependencies are missing."""
    import importlib.metadata
    import importlib.util
    import platform

    dists = {"yaml": "pyyaml"}
    versions: dict[str, str | None] = {}
    for name in RUNTIME_PACKAGES:
        if importlib.util.find_spec(name) is None:
            versions[name] = None
            continue
        try:
            versions[name] = importlib.metadata.version(dists.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "present (no metadata)"
    import torch

    return {
        "python": platform.python_version(),
        "versions": versions,
        "missing": [k for k, v in versions.items() if v is None],
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "device": device,
        "rlino_from": str(Path(importlib.util.find_spec("rlino").origin).parent),
    }


def add_mfu(report: dict[str, Any]) -> None:
    """Model-FLOP utilisation of the measured GRPO iteration, against the measured matmul rate."""
    step_row = report.get("grpo_step", {}).get("measured")
    peak = report.get("device", {}).get("bf16_matmul_tflops")
    if not step_row or not peak:
        return
    peak_flops = peak * 1e12
    total = step_row["rollout_flops"] + step_row["update_flops"]
    report["grpo_step"]["mfu"] = {
        "peak_tflops": peak,
        "iteration": sig(total / step_row["wall_s"] / peak_flops),
        "rollout": sig(step_row["rollout_flops"] / step_row["rollout_s"] / peak_flops),
        "update": sig(step_row["update_flops"] / step_row["update_s"] / peak_flops),
        "achieved_tflops": sig(total / step_row["wall_s"] / 1e12),
        "mfu_issue_formula": sig(step_row["issue_formula_flops"] / step_row["wall_s"] / peak_flops),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma list of sections to run (default all)"
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=450.0,
        help="seconds after which no section starts or outlives it (default 450)",
    )
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_rlino_importable()
    if args.worker:
        worker_main(args)
        return
    start = time.perf_counter()
    shape = SMALL if args.small else FULL
    wanted = args.sections.split(",")
    report: dict[str, Any] = {
        "script": "gpu_check",
        "args": {"device": args.device, "small": args.small, "sections": wanted},
    }
    try:
        report["env"] = env_info(args.device)
    except Exception as err:
        report["env"] = {"error": f"{type(err).__name__}: {err}"}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-model-"))
    model_dir = work / "random-qwen2"
    try:
        for name in SECTIONS:
            left = args.deadline - (time.perf_counter() - start)
            if name not in wanted:
                report[name] = {"skipped": "not in --sections"}
                continue
            if name == "cpu_tests" and args.small:
                report[name] = {"skipped": "--small (the full run runs them)"}
                continue
            if left < 15:
                report[name] = {"skipped": f"deadline: {left:.0f} s left"}
                continue
            limit = min(shape.limits[name], left)
            log(f"section {name} (limit {limit:.0f} s)")
            t0 = time.perf_counter()
            try:
                if name == "tests":
                    report[name] = run_pytest(
                        ["tests/test_gpu_check.py", "-k", "cuda"], args, limit
                    )
                elif name == "cpu_tests":
                    selection = [*CPU_TEST_FILES, "-m", "not slow"]
                    report[name] = run_pytest(selection, args, limit)
                elif name in NEEDS_MODEL and "error" in report.get("model", {"error": 1}):
                    report[name] = {"error": "no model (section model failed or was not run)"}
                else:
                    report[name] = run_worker(name, args, model_dir, limit)
            except Exception as err:
                report[name] = {"error": f"{type(err).__name__}: {err}"}
            report[name]["section_s"] = round(time.perf_counter() - t0, 1)
        add_mfu(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["errors"] = [k for k in SECTIONS if "error" in report.get(k, {})]
    report["failed_tests"] = sum(
        report.get(k, {}).get(n, 0) for k in ("tests", "cpu_tests") for n in ("failed", "errors")
    )
    report["ok"] = not report["errors"] and not report["failed_tests"]
    report["total_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
