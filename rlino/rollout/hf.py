"""The Hugging Face `generate` backend: the reference the built-in sampler is checked against.

Stop strings are handed to `generate` (it stops a row once its text contains one); the completion
mask is then rebuilt from the tokens: everything up to and including the first stop id, or the
shortest prefix whose text contains a stop string. Sampling log-probs are not returned (they would
need the full (N, T, V) scores), so `Rollouts.logprobs` is None.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from rlino.rollout import Rollouts, SamplingConfig, left_pad, stop_ids

if TYPE_CHECKING:
    from rlino.policy import Policy


def stop_lengths(
    completion: list[list[int]], stops: set[int], stop_strings: tuple[str, ...], tokenizer: object
) -> list[tuple[int, bool]]:
    """For each token row: (number of tokens kept, stopped?) under stop ids and stop strings."""
    result = []
    for row in completion:
        keep, stopped = len(row), False
        for i, tok in enumerate(row):
            if tok in stops:
                keep, stopped = i + 1, True
                break
        if stop_strings and _has_stop(tokenizer, row[:keep], stop_strings):
            lo, hi = 1, keep  # smallest prefix containing a stop string, by bisection
            while lo < hi:
                mid = (lo + hi) // 2
                if _has_stop(tokenizer, row[:mid], stop_strings):
                    hi = mid
                else:
                    lo = mid + 1
            keep, stopped = lo, True
        result.append((keep, stopped))
    return result


def _has_stop(tokenizer: object, ids: list[int], stop_strings: tuple[str, ...]) -> bool:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in stop_strings)


def generate_hf(
    policy: Policy,
    prompt_ids: list[list[int]],
    num_samples: int,
    config: SamplingConfig,
    *,
    seed: int,
    batch_size: int | None = None,
) -> Rollouts:
    """Sample with `model.generate`; see `rlino.rollout.generate` for the contract (CPU tensors out)."""
    model, tokenizer = policy.model, policy.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    padded, pad_mask = left_pad(prompt_ids, pad_id)
    ids = torch.tensor(padded, dtype=torch.long)  # (P, Lp)
    mask = torch.tensor(pad_mask, dtype=torch.bool)  # (P, Lp)
    num_prompts, prompt_len = ids.shape
    per_chunk = num_prompts if batch_size is None else max(1, batch_size // num_samples)
    stops = stop_ids(policy, config)
    sample = config.temperature > 0
    # `generate` falls back to the model's EOS when given None, so "no stop id" (ignore_eos) is an id
    # the model can never produce: the vocabulary size.
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.eos_token_id = stops or [model.config.get_text_config().vocab_size]
    options: dict[str, object] = {
        "generation_config": gen_config,
        "max_new_tokens": config.max_new_tokens,
        "do_sample": sample,
        "pad_token_id": pad_id,
    }
    if sample:
        options.update(
            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None
        )
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if config.stop_strings:
        options.update(stop_strings=list(config.stop_strings), tokenizer=tokenizer)

    rows: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in range(0, num_prompts, per_chunk):
                with torch.inference_mode():
                    chunk = slice(i, i + per_chunk)
                    out = model.generate(
                        ids[chunk].repeat_interleave(num_samples, dim=0).to(policy.device),
                        attention_mask=mask[chunk]
                        .repeat_interleave(num_samples, dim=0)
                        .long()
                        .to(policy.device),
                        **options,
                    )
                rows.extend(out[:, prompt_len:].cpu().tolist())
    finally:
        model.train(was_training)

    kept = stop_lengths(rows, set(stops), config.stop_strings, tokenizer)
    width = max(1, max(k for k, _ in kept))
    completion = torch.full((len(rows), width), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (row, (keep, _)) in enumerate(zip(rows, kept, strict=True)):
        completion[r, :keep] = torch.tensor(row[:keep], dtype=torch.long)
        comp_mask[r, :keep] = True
    return Rollouts(
        prompt_ids=ids.repeat_interleave(num_samples, dim=0),
        prompt_mask=mask.repeat_interleave(num_samples, dim=0),
        completion_ids=completion,
        completion_mask=comp_mask,
        finished=torch.tensor([stopped for _, stopped in kept], dtype=torch.bool),
        prompt_index=torch.arange(num_prompts).repeat_interleave(num_samples),
        logprobs=None,
        stop_strings=config.stop_strings,
    )
