"""The rlino half of bench_step.py: the training loop's `rlino.step.step`, timed on the same case.

Runs in its own process (bench_step.py's `--worker rlino`), so its peak RSS is its own; it needs
only rlino. `case` is a bench_step.Case (prompts, samples, new_tokens, task, forced,
micro_batch_tokens). The case's prompts become a registered task (parity: TEXT_PROMPTS scored by
the crc32 bit; gsm8k: rlino's GSM8K task on the first P test problems, checked against the
prompt texts the TRL half gets and against TRL's EOS), trained with the settings bench_step.py's
docstring lists.

Besides each iteration's seconds (the step and the lr scheduler step) it reports its sampling and
update parts, the tokens sampled, the rows and real tokens trained, and the tokens the update's
micro-batches put through the model, padding and filler included (`rlino.update.tokens_computed`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import (
    GSM8K_TEMPLATE,
    TEXT_PROMPTS,
    gsm8k_examples,
    gsm8k_prompts,
    log,
    parity_reward,
    set_threads,
)

TASK_NAME = "bench-crc-parity"
GSM8K_TASK_NAME = "bench-gsm8k-test"


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


def register_gsm8k_task(prompts: int) -> None:
    """Register GSM8K_TASK_NAME: rlino's GSM8K task on the first `prompts` test problems (as the
    training set), chat template, no stop strings (EOS ends a completion, as in TRL)."""
    from rlino.tasks import Example, register_task
    from rlino.tasks.gsm8k import SHIPPED_DIR, GSM8KTask

    class BenchGSM8K(GSM8KTask):
        name = GSM8K_TASK_NAME
        default_template = GSM8K_TEMPLATE

        def examples(self, split: str) -> list[Example]:
            return super().examples("test")[:prompts]

        def stop_strings(self, template: str | None = None) -> tuple[str, ...]:
            return ()

    register_task(GSM8K_TASK_NAME)(lambda **_: BenchGSM8K(path=str(SHIPPED_DIR)))


def rlino_config(model_dir: Path, case: Any, args: argparse.Namespace) -> Any:
    """rlino's TrainConfig for `case` (see the module docstring for what each setting matches)."""
    from rlino.config import load_config

    n = case.prompts * case.samples
    task = (
        {"name": TASK_NAME}
        if case.task == "parity"
        else {"name": GSM8K_TASK_NAME, "template": GSM8K_TEMPLATE}
    )
    return load_config(
        overrides={
            "model": {"path": str(model_dir), "dtype": args.dtype, "device": "cpu"},
            "task": task,
            "method": {"name": "grpo", "beta": 0.0, "clip_eps": 0.2, "aggregation": "seq-mean"},
            "rollout": {
                "prompts_per_iter": case.prompts,
                "samples_per_prompt": case.samples,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "max_new_tokens": case.new_tokens,
                "ignore_eos": case.forced,  # forced: every completion runs to the cap, as in TRL
                "on_truncation": "keep",  # as TRL's default mask_truncated_completions=False
            },
            "optim": {
                "lr": args.lr,
                "grad_clip": 1.0,
                "minibatch_size": n,
                "micro_batch_size": n,
                "micro_batch_tokens": case.micro_batch_tokens,
                "packing": args.packing,
            },
            "eval": {"every": 0, "num_examples": 1},
            "threads": args.threads,
            "tensorboard": False,
        }
    )


def update_work(setup: Any, result: Any) -> dict[str, int]:
    """What one iteration's update ran: rows with a gradient, their real tokens, and the tokens
    the micro-batches put through the model (padding and filler included, a shared prompt once).

    Recomputed after the timed step from its batch and weights by `rlino.update.tokens_computed`
    (the micro-batching and layouts the update itself uses), on the rows `rlino.update.update`
    runs at beta 0: those whose weight is not 0 (an all-equal group's are 0 and never run).
    """
    import torch

    from rlino.update import MicroBatching, TokenBatch, tokens_computed

    cfg = setup.config
    batch = TokenBatch.from_rollouts(result.scored.rollouts, torch.device("cpu"))
    weights = result.weights.reshape(len(batch), -1)
    rows = torch.nonzero((weights != 0).any(dim=1)).flatten()
    cut = MicroBatching(cfg.optim.micro_batch_size, cfg.optim.micro_batch_tokens, cfg.optim.packing)
    run, micros = tokens_computed(setup.compute_policy.model, batch, rows, cut)
    return {
        "trained_rows": len(rows),
        "trained_tokens": int(batch.attn[rows].sum()),
        "update_tokens_run": run,
        "micro_batches": micros,
    }


def check_gsm8k_side(setup: Any, case: Any) -> list[int]:
    """Case gsm8k: rlino's prompts are `gsm8k_prompts`' texts and only TRL's EOS id ends a
    completion; returns the P prompts' token counts."""
    from rlino.rollout import eos_ids
    from rlino.tasks import encode_prompts

    tokenizer = setup.policy.tokenizer
    texts = gsm8k_prompts(tokenizer, gsm8k_examples(case.prompts))
    ids = encode_prompts(tokenizer, setup.task, setup.train_examples, setup.template)
    if ids != [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]:
        sys.exit("bench_step: rlino's GSM8K prompts differ from the shared prompt texts")
    if eos_ids(setup.policy) != [tokenizer.eos_token_id]:
        sys.exit(f"bench_step: rlino stops on {eos_ids(setup.policy)}, TRL on the tokenizer's EOS")
    return [len(i) for i in ids]


def run_rlino(model_dir: Path, case: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time rlino's training-loop iteration (`rlino.step.step`) on `case`; seconds per iteration,
    its sampling and update parts, and the tokens sampled and trained."""
    set_threads(args.threads)
    import torch

    from rlino.setup import build, make_optimizer, make_scheduler
    from rlino.step import step

    if case.task == "parity":
        register_parity_task(TEXT_PROMPTS[: case.prompts])
    else:
        register_gsm8k_task(case.prompts)
    config = rlino_config(model_dir, case, args)
    torch.manual_seed(config.seed)
    setup = build(config)
    prompt_tokens = check_gsm8k_side(setup, case) if case.task == "gsm8k" else None
    optimizer = make_optimizer(setup)
    scheduler = make_scheduler(optimizer, config)
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens}  # + a list per key of `row` below
    for iteration in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        result = step(setup, iteration, optimizer)
        scheduler.step()
        seconds = time.perf_counter() - t0
        lengths = result.scored.lengths
        if case.forced and not bool((lengths == case.new_tokens).all()):
            sys.exit(f"bench_step: rlino completions not all {case.new_tokens} tokens long")
        if not bool(((lengths >= 1) & (lengths <= case.new_tokens)).all()):
            sys.exit(f"bench_step: rlino completion lengths outside 1..{case.new_tokens}")
        row = {
            "iter_s": seconds,
            "rollout_s": result.metrics["time/rollout_s"],
            "update_s": result.metrics["time/update_s"],
            "reward_mean": float(result.scored.rewards.mean()),
            "sampled_tokens": int(lengths.sum()),
            "completion_len_mean": float(lengths.float().mean()),
            **update_work(setup, result),
        }
        for key, value in row.items():
            out.setdefault(key, []).append(value)
        log(
            f"rlino {case.name} iteration {iteration}: {seconds:.2f} s "
            f"(rollout {row['rollout_s']:.2f} s, {row['sampled_tokens']} tokens sampled, "
            f"{row['trained_rows']} rows / {row['trained_tokens']} tokens trained)"
        )
    return out
