"""The TRL half of bench_step.py: one `GRPOTrainer` step per iteration on the same case.

Runs in its own process (bench_step.py's `--worker trl`), so its peak RSS is its own. `case` is a
bench_step.Case (prompts, samples, new_tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import TEXT_PROMPTS, log, parity_reward, set_threads


def run_trl(model_dir: Path, case: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time TRL GRPOTrainer steps on `case`; returns seconds per step."""
    set_threads(args.threads)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    n = case.prompts * case.samples
    micro = args.trl_micro_batch or n
    if n % micro:
        sys.exit(f"bench_step: --trl-micro-batch must divide P*G = {n}")
    lengths: list[int] = []
    rewards: list[float] = []

    def reward_fn(completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        lengths.extend(len(ids) for ids in completion_ids)
        out = [parity_reward(text) for text in completions]
        rewards.append(sum(out) / len(out))
        return out

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)
            log(f"trl {case.name} step {len(times) - 1}: {times[-1]:.2f} s")

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    steps = args.warmup + args.iters
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        grpo = grpo_config(out_dir, case, args, micro, steps)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_fn,
            args=grpo,
            train_dataset=Dataset.from_dict({"prompt": TEXT_PROMPTS[: case.prompts]}),
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
        bf16 = args.dtype == "bf16"
        if trainer.args.bf16 != bf16 or trainer.args.gradient_checkpointing or trainer.beta != 0:
            sys.exit(f"bench_step: TRL is not running {args.dtype} without checkpointing at beta 0")
        if bf16 and trainer.accelerator.mixed_precision != "bf16":
            sys.exit("bench_step: TRL's accelerator is not in bf16 mixed precision")
        trainer.train()
    if len(times) != steps or len(lengths) != steps * n:
        sys.exit(f"bench_step: TRL ran {len(times)} steps / {len(lengths)} completions")
    if any(length != case.new_tokens for length in lengths):
        sys.exit(f"bench_step: TRL completions not all {case.new_tokens} tokens long")
    return {"iter_s": times, "reward_mean": rewards}


def grpo_config(out_dir: str, case: Any, args: argparse.Namespace, micro: int, steps: int) -> Any:
    """TRL's settings for the same work as rlino's side (see bench_step.py's docstring)."""
    from trl import GRPOConfig

    n = case.prompts * case.samples
    return GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=args.dtype == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=n // micro,
        steps_per_generation=n // micro,
        num_iterations=1,
        num_generations=case.samples,
        max_completion_length=case.new_tokens,
        generation_kwargs={"min_new_tokens": case.new_tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=steps + 1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
