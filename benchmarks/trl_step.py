"""The TRL half of bench_step.py: one `GRPOTrainer` step per iteration on the same case.

Runs in its own process (bench_step.py's `--worker trl`), so its peak RSS is its own. `case` is a
bench_step.Case (prompts, samples, new_tokens, task, forced, trl_micro_batch).

Besides each step's seconds it reports, per step, the tokens sampled (completion tokens, the EOS
that ended one included, as rlino counts them), the tokens trained (TRL's loss runs every one of
the P*G rows, its prompt and completion), the mean completion length and the seconds spent in
the model's `generate` (timed by wrapping the model instance's `generate`, which also yields
the prompt lengths TRL fed it, checked against the shared prompts in case gsm8k).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import (
    TEXT_PROMPTS,
    gsm8k_examples,
    gsm8k_prompts,
    gsm8k_task,
    log,
    parity_reward,
    set_threads,
)


def case_prompts(case: Any, tokenizer: Any) -> tuple[list[str], Any]:
    """The case's P prompt texts and its scorer `score(text, prompt_index) -> reward`.

    parity: TEXT_PROMPTS and the crc32 bit. gsm8k: the first P GSM8K test problems rendered as
    rlino renders them (`gsm8k_prompts`) and rlino's GSM8K verifier, the reward rlino's side
    gets for the same text.
    """
    if case.task == "parity":
        return TEXT_PROMPTS[: case.prompts], lambda text, _: parity_reward(text)
    examples = gsm8k_examples(case.prompts)
    task = gsm8k_task()
    texts = gsm8k_prompts(tokenizer, examples)
    return texts, lambda text, index: task.score(text, examples[index]).reward


def expected_prompt_tokens(case: Any, tokenizer: Any, texts: list[str]) -> list[int] | None:
    """Case gsm8k: each prompt's token count, as rlino encodes it (no added special tokens);
    exits when adding special tokens would change it, since TRL's choice would then matter.
    None for the parity cases (raw text, whichever specials TRL adds)."""
    if case.task == "parity":
        return None
    plain = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    special = [len(tokenizer(t)["input_ids"]) for t in texts]
    if plain != special:
        sys.exit("bench_step: this tokenizer adds special tokens to chat prompts; TRL may differ")
    return plain


def per_step_generation(
    calls: list[tuple[int, float, list[int] | None]], rows: int, steps: int
) -> list[tuple[float, list[int] | None]] | None:
    """The recorded `generate` calls grouped into steps of `rows` rows: (seconds, prompt
    lengths) per step; None when they do not add up to `steps` such groups."""
    out: list[tuple[float, list[int] | None]] = []
    seconds, lengths, count = 0.0, [], 0
    known = True
    for n, s, plens in calls:
        seconds += s
        count += n
        known = known and plens is not None
        lengths += plens or []
        if count == rows:
            out.append((seconds, lengths if known else None))
            seconds, lengths, count, known = 0.0, [], 0, True
        elif count > rows:
            return None
    return out if len(out) == steps and count == 0 else None


def run_trl(model_dir: Path, case: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time TRL GRPOTrainer steps on `case`; returns seconds and tokens per step."""
    set_threads(args.threads)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    n = case.prompts * case.samples
    micro = case.trl_micro_batch or n
    if n % micro:
        sys.exit(f"bench_step: the TRL micro-batch must divide P*G = {n}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts, score = case_prompts(case, tokenizer)
    prompt_tokens = expected_prompt_tokens(case, tokenizer, texts)
    lengths: list[int] = []
    rewards: list[float] = []
    wrong_prompts: list[int] = []

    def reward_fn(
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        example_index: list[int],
        **_: Any,
    ) -> list[float]:
        lengths.extend(len(ids) for ids in completion_ids)
        wrong_prompts.extend(
            i for p, i in zip(prompts, example_index, strict=True) if p != texts[i]
        )
        out = [score(text, i) for text, i in zip(completions, example_index, strict=True)]
        rewards.append(sum(out) / len(out))
        return out

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)
            log(f"trl {case.name} step {len(times) - 1}: {times[-1]:.2f} s")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generations: list[tuple[int, float, list[int] | None]] = []
    plain_generate = model.generate

    def timed_generate(*a: Any, **k: Any) -> Any:
        """The model's own generate, timed; records rows and the prompt lengths it was given."""
        start = time.perf_counter()
        out = plain_generate(*a, **k)
        seconds = time.perf_counter() - start
        ids = k.get("input_ids", a[0] if a else None)
        mask = k.get("attention_mask")
        plens = None if mask is None else [int(x) for x in mask.sum(dim=1).tolist()]
        generations.append((0 if ids is None else int(ids.shape[0]), seconds, plens))
        return out

    model.generate = timed_generate  # the instance's: TRL calls the unwrapped model's generate
    steps = args.warmup + args.iters
    dataset = Dataset.from_dict({"prompt": texts, "example_index": list(range(len(texts)))})
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        grpo = grpo_config(out_dir, case, args, micro, steps)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_fn,
            args=grpo,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
        bf16 = args.dtype == "bf16"
        if trainer.args.bf16 != bf16 or trainer.args.gradient_checkpointing or trainer.beta != 0:
            sys.exit(f"bench_step: TRL is not running {args.dtype} without checkpointing at beta 0")
        if bf16 and trainer.accelerator.mixed_precision != "bf16":
            sys.exit("bench_step: TRL's accelerator is not in bf16 mixed precision")
        if getattr(trainer.args, "mask_truncated_completions", False):
            sys.exit("bench_step: TRL masks truncated completions; rlino keeps them")
        trainer.train()
    if len(times) != steps or len(lengths) != steps * n:
        sys.exit(f"bench_step: TRL ran {len(times)} steps / {len(lengths)} completions")
    if case.forced and any(length != case.new_tokens for length in lengths):
        sys.exit(f"bench_step: TRL completions not all {case.new_tokens} tokens long")
    if any(not 1 <= length <= case.new_tokens for length in lengths):
        sys.exit(f"bench_step: TRL completion lengths outside 1..{case.new_tokens}")
    if wrong_prompts:
        sys.exit(
            f"bench_step: TRL's reward saw prompts other than the shared ones: {wrong_prompts}"
        )
    return step_series(case, times, rewards, lengths, generations, prompt_tokens)


def step_series(
    case: Any,
    times: list[float],
    rewards: list[float],
    lengths: list[int],
    generations: list[tuple[int, float, list[int] | None]],
    prompt_tokens: list[int] | None,
) -> dict[str, Any]:
    """The per-step JSON of the TRL side (see the module docstring); checks that `generate` got
    the shared prompts' lengths (each G times) where they are known."""
    n = case.prompts * case.samples
    steps = len(times)
    per_step = per_step_generation(generations, n, steps)
    if per_step is None:
        log("trl: the model's generate calls were not seen as one per step; no generate_s")
    expected = None if prompt_tokens is None else sorted(prompt_tokens * case.samples)
    sampled, trained = [], []
    for k in range(steps):
        completion = lengths[k * n : (k + 1) * n]
        prompts = per_step[k][1] if per_step is not None else None
        if expected is not None and prompts is not None and sorted(prompts) != expected:
            sys.exit("bench_step: TRL generated from prompts of other lengths than rlino's")
        prompt_sum = sum(prompts) if prompts is not None else None
        if prompt_sum is None and prompt_tokens is not None:
            prompt_sum = sum(prompt_tokens) * case.samples
        sampled.append(sum(completion))
        trained.append(None if prompt_sum is None else prompt_sum + sum(completion))
    return {
        "iter_s": times,
        "reward_mean": rewards,
        "prompt_tokens": prompt_tokens,
        "generate_s": None if per_step is None else [s for s, _ in per_step],
        "sampled_tokens": sampled,
        "trained_tokens": None if None in trained else trained,
        "trained_rows": [n] * steps,
        "completion_len_mean": [s / n for s in sampled],
    }


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
        # forced: no EOS before new_tokens; natural: EOS or the cap, max_completion_length
        generation_kwargs={"min_new_tokens": case.new_tokens} if case.forced else None,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        remove_unused_columns=False,  # the reward needs the example_index column
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
