"""Rollout engines: sample completions for token-id prompts, several samples per prompt.

All backends take prompts as lists of token ids and return a `Rollouts` batch of plain tensors, so
verifiers, weighting and the training step never care which engine produced the samples:

- "builtin" (`rlino.rollout.sampler`): a batched KV-cache sampler on the model's own forward; the
  default, fastest on CPU and for small models.
- "hf" (`rlino.rollout.hf`): Hugging Face `generate`, the reference the built-in one is tested against.
- "vllm" (`rlino.rollout.vllm`): vLLM on a GPU, when installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlino.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlino.policy import Policy

BACKENDS = ("builtin", "hf", "vllm")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one completion; the same meaning in every backend."""

    temperature: float = 1.0
    """softmax temperature; 0 means greedy decoding"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)"""
    top_k: int = 0
    """keep only the k most likely tokens (0 = off)"""
    max_new_tokens: int = 128
    """hard cap on completion length in tokens"""
    stop_strings: tuple[str, ...] = ()
    """stop once the completion text contains one of these (may span several tokens)"""
    stop_token_ids: tuple[int, ...] = ()
    """extra token ids that end a completion; the tokenizer's EOS always does"""
    ignore_eos: bool = False
    """keep sampling past EOS (for benchmarks that need fixed lengths); stop strings/ids still apply"""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise UserError("stop_strings must not contain the empty string")


@dataclass
class Rollouts:
    """A batch of sampled completions, one row per sample (num_samples consecutive rows per prompt)."""

    prompt_ids: torch.Tensor
    """(N, Lp) long, prompts left-padded with the pad id"""
    prompt_mask: torch.Tensor
    """(N, Lp) bool, True on real prompt tokens"""
    completion_ids: torch.Tensor
    """(N, Lc) long, right-padded with the pad id"""
    completion_mask: torch.Tensor
    """(N, Lc) bool, True on generated tokens up to and including the stop token"""
    finished: torch.Tensor
    """(N,) bool, True when EOS / a stop id / a stop string ended the sample (not the length cap)"""
    prompt_index: torch.Tensor
    """(N,) long, index of each row's prompt in the input list"""
    logprobs: torch.Tensor | None = None
    """(N, Lc) float, log-prob of each chosen token under the sampling distribution, 0 on padding"""
    stop_strings: tuple[str, ...] = ()
    """the stop strings in force, so `texts` can cut the text right after the first one"""

    def texts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Decoded completions without padding or special tokens, cut just after a stop string."""
        rows = [
            ids[mask].tolist()
            for ids, mask in zip(self.completion_ids, self.completion_mask, strict=True)
        ]
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [cut_after_stop(text, self.stop_strings) for text in texts]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) number of completion tokens per sample."""
        return self.completion_mask.sum(dim=1)


def cut_after_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    """Drop everything after the earliest stop string (a stop token can carry extra characters)."""
    ends = [text.find(s) + len(s) for s in stop_strings if s in text]
    return text[: min(ends)] if ends else text


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[bool]]]:
    """Left-pad token lists to a common width; returns (ids, mask) as nested lists."""
    if not prompt_ids:
        raise UserError("no prompts given")
    if any(len(p) == 0 for p in prompt_ids):
        raise UserError("every prompt needs at least one token")
    width = max(len(p) for p in prompt_ids)
    ids = [[pad_id] * (width - len(p)) + list(p) for p in prompt_ids]
    mask = [[False] * (width - len(p)) + [True] * len(p) for p in prompt_ids]
    return ids, mask


def eos_ids(policy: Policy) -> list[int]:
    """All token ids that mean end-of-sequence for this policy (tokenizer and generation config)."""
    ids: set[int] = set()
    if policy.tokenizer.eos_token_id is not None:
        ids.add(int(policy.tokenizer.eos_token_id))
    gen_eos = getattr(getattr(policy.model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def stop_ids(policy: Policy, config: SamplingConfig) -> list[int]:
    """Token ids that end a sample: EOS (unless ignored) plus the configured stop ids."""
    ids = set(config.stop_token_ids)
    if not config.ignore_eos:
        ids.update(eos_ids(policy))
    return sorted(ids)


PROMPT_SEED_STRIDES = (1_000_000_007, 7_919, 1)
"""seed of prompt i under call seed s = s * a + i * b + c mod 2^63 (distinct primes)"""


def prompt_seeds(seed: int, indices: Iterable[int]) -> list[int]:
    """One sampling seed per prompt, a pure function of (seed, the prompt's global index).

    A data-parallel rank passes the global indices of its shard, so each prompt draws the same
    completions on any number of ranks and in any batch.
    """
    a, b, c = PROMPT_SEED_STRIDES
    return [(seed * a + i * b + c) % 2**63 for i in indices]


def generate(
    policy: Policy,
    prompt_ids: list[list[int]],
    num_samples: int,
    config: SamplingConfig,
    *,
    seed: int | Sequence[int],
    backend: str = "builtin",
    batch_size: int | None = None,
) -> Rollouts:
    """Sample `num_samples` completions for each prompt with the chosen backend.

    `seed`: one int (prompt i then gets `prompt_seeds(seed, [i])`), or one seed per prompt. With
    the built-in backend a prompt's samples depend on its own seed only, whatever else is in the
    batch and whatever `batch_size` (up to float rounding where batch shape changes a kernel's
    arithmetic); the hf and vllm backends take one seed for the call (the first, if several) and
    are deterministic for a given seed, device and batch_size only. `batch_size` caps the number
    of rows (samples) decoded at once; None decodes everything in one batch.
    """
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(seed, int):
        seeds = prompt_seeds(seed, range(len(prompt_ids)))
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        seed = seeds[0] if seeds else 0
    if backend == "builtin":
        from rlino.rollout.sampler import generate_builtin

        return generate_builtin(
            policy, prompt_ids, num_samples, config, seeds=seeds, batch_size=batch_size
        )
    if backend == "hf":
        from rlino.rollout.hf import generate_hf

        return generate_hf(
            policy, prompt_ids, num_samples, config, seed=seed, batch_size=batch_size
        )
    if backend == "vllm":
        from rlino.rollout.vllm import generate_vllm

        return generate_vllm(policy, prompt_ids, num_samples, config, seed=seed)
    raise UserError(f"unknown rollout backend {backend!r}; choose one of {', '.join(BACKENDS)}")
