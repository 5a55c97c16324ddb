"""The built-in rollout engine: batched sampling with a preallocated KV cache and a lean decode step.

Why not `model.generate`: for the small models rlino trains on CPU, per-step overhead dominates. HF's
DynamicCache grows by `torch.cat` every step (a fresh multi-MB allocation per layer, and on CPU the
kernel faults those pages in each time), the 4-D attention mask is rebuilt every step, and every
token passes a chain of logits processors and stopping criteria. Here instead:

- the cache is one slab per layer, allocated once at (rows, 2, heads, prompt + max_new, head_dim)
  (keys and values side by side); each step writes one column in place and attention reads a view
  of the filled part;
- the prompts are prefilled once, P rows, through the model's own forward, and their keys/values
  are broadcast into the G sample rows of each prompt while being written (no repeated prefill);
- decode steps of Llama, Qwen2 and Mistral models run through `fast_decode.LeanDecoder`, the same
  arithmetic as the model's forward (same logits, bit for bit on CPU in fp32) without its module
  and mask machinery; other architectures step through the model's forward, with the decode mask
  handed over ready-made as a sliced (rows, 1, 1, L) bool tensor where transformers allows it
  (sdpa, full attention in every layer);
- sampling is a two-level inverse-CDF draw (two random numbers per row, not one per vocabulary
  entry) from one seeded `torch.Generator` per prompt, which draws for all G rows of its prompt
  every step, finished or not: a sample depends on its prompt's seed alone, not on which other
  prompts share the batch or how it is chunked (what keeps N data-parallel ranks equal to one), and the sampling log-prob of each chosen token; without top-k
  and top-p (the usual RL setting) it reads the logits once, in cache-sized chunks;
- rows that hit EOS, a stop id or a stop string are dropped from the batch (cache, mask, positions)
  every few steps, so finished samples stop costing compute.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rlino.rollout import Rollouts, SamplingConfig, left_pad, stop_ids
from rlino.rollout.draw import sample_next
from rlino.rollout.fast_decode import LeanDecoder, lean_decoder

if TYPE_CHECKING:
    from rlino.policy import Policy


class _PromptNoise:
    """The random numbers of one chunk of prompts: one generator per prompt, G rows each."""

    def __init__(self, seeds: list[int], group: int, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.group, self.device = group, device

    def uniforms(self, rows: torch.Tensor) -> torch.Tensor:
        """(b, 2) uniforms for the active `rows` (original row indices in this chunk)."""
        draws = [
            torch.rand((self.group, 2), generator=g, device=self.device) for g in self.generators
        ]
        return torch.cat(draws).index_select(0, rows)


COMPACT_EVERY = 8
"""steps between checks for finished rows to drop from the batch"""


def cache_keyword(model: torch.nn.Module) -> str:
    """The name forward takes the KV cache by: `cache` in recent transformers (5.2x), which
    still accept `past_key_values` with a warning; `past_key_values` in earlier 5.x, which would
    silently ignore `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _SlabLayer(DynamicLayer):
    """One layer's keys/values in a slab preallocated for the whole generation, written in place."""

    def __init__(self, rows: int, max_len: int, group: int) -> None:
        super().__init__()
        self.rows, self.max_len, self.group = rows, max_len, group
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, k_dim = key_states.shape
        if value_states.shape[-1] != k_dim:
            raise RuntimeError("the slab cache needs keys and values of the same head size")
        self.device = key_states.device
        self._set_slab(key_states.new_empty((self.rows, 2, heads, self.max_len, k_dim)))
        self.is_initialized = True

    def _set_slab(self, slab: torch.Tensor) -> None:
        """Keys and values live in one (rows, 2, heads, max_len, head_dim) slab: one copy per step."""
        self.slab = slab
        self.keys, self.values = slab[:, 0], slab[:, 1]  # (rows, heads, max_len, head_dim) views

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new states at the current length; return the filled part (a view, no copy)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self.length = end
        if key_states.shape[0] == self.keys.shape[0]:
            self.keys[:, :, start:end].copy_(key_states)
            self.values[:, :, start:end].copy_(value_states)
            return self.keys[:, :, :end], self.values[:, :, :end]
        if start != 0:
            raise RuntimeError("only the prefill may write fewer rows than the cache holds")
        # Prefill of P prompts: broadcast each prompt's states into its G consecutive sample rows.
        self.keys[:, :, :end].unflatten(0, (-1, self.group)).copy_(key_states.unsqueeze(1))
        self.values[:, :, :end].unflatten(0, (-1, self.group)).copy_(value_states.unsqueeze(1))
        return key_states, value_states  # the prompt attends to itself only

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_len

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the given rows, copying just the filled columns."""
        if not self.is_initialized:
            return
        old = self.slab
        new = old.new_empty((indices.numel(), *old.shape[1:]))
        new[..., : self.length, :] = old[indices, ..., : self.length, :]
        self._set_slab(new)


class SlabCache(Cache):
    """A transformers `Cache` of `_SlabLayer`s: rows x (prompt + max_new) preallocated per layer."""

    def __init__(self, num_layers: int, rows: int, max_len: int, group: int = 1) -> None:
        super().__init__(layers=[_SlabLayer(rows, max_len, group) for _ in range(num_layers)])


class _StopStrings:
    """Incremental stop-string detector: decode only a short tail of each still-running row."""

    def __init__(self, tokenizer: object, stop_strings: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        # A non-special token decodes to at least one character, so this many tokens cover any
        # stop string that the newest token can complete, with room for split multi-byte characters
        # and a few special tokens (which decode to nothing, as in `Rollouts.texts`).
        self.window = 2 * max(len(s) for s in stop_strings) + 8

    def hits(self, completion: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        """(len(rows),) bool: does the tail of each row (ending at `step`) contain a stop string."""
        start = max(0, step + 1 - self.window)
        tails = completion[rows, start : step + 1].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        found = [any(s in text for s in self.stop_strings) for text in texts]
        return torch.tensor(found, dtype=torch.bool, device=rows.device)


def _fast_mask_ok(model: torch.nn.Module) -> bool:
    """Can the decode mask be passed ready-made (sdpa, full attention in every layer)?"""
    config = model.config.get_text_config()
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return config._attn_implementation == "sdpa" and layer_types == {"full_attention"}


class _ModelStep:
    """Decode steps through the model's own forward: works for any architecture."""

    def __init__(self, model: torch.nn.Module, cache: SlabCache, attn: torch.Tensor) -> None:
        self.model, self.cache, self.attn = model, cache, attn  # attn: (N, Lp + T) bool
        self.ready_made = _fast_mask_ok(model)
        self.cache_keyword = cache_keyword(model)  # once, not per decode step

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Feed (b,) tokens at (b,) positions, the cache filled up to `length` after; (b, V) logits."""
        attn = self.attn[:, :length]  # (b, length)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=attn[:, None, None, :] if self.ready_made else attn.long(),
            position_ids=positions[:, None],
            **{self.cache_keyword: self.cache},
            use_cache=True,
        )
        return out.logits[:, -1]  # (b, V)

    def select(self, keep: torch.Tensor, filled: int) -> None:
        """Keep only rows `keep` (the cache holds `filled` columns)."""
        self.cache.batch_select_indices(keep)
        self.attn = self.attn[keep]


class _LeanStep:
    """Decode steps through `LeanDecoder` on the same slab cache the prefill filled."""

    def __init__(self, decoder: LeanDecoder, cache: SlabCache, attn: torch.Tensor) -> None:
        self.decoder, self.cache = decoder, cache
        self.slabs = [layer.slab for layer in cache.layers]
        self.mask = torch.zeros(attn.shape, dtype=decoder.embed.dtype, device=attn.device)
        self.mask = self.mask.masked_fill_(~attn, float("-inf"))[:, None, None, :]  # (N,1,1,L)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        return self.decoder.step(
            tokens, positions, self.slabs, length - 1, self.mask[..., :length]
        )  # (b, V)

    def select(self, keep: torch.Tensor, filled: int) -> None:
        for layer in self.cache.layers:  # the lean step writes the slabs behind the cache's back
            layer.length = filled
        self.cache.batch_select_indices(keep)
        self.slabs = [layer.slab for layer in self.cache.layers]
        self.mask = self.mask[keep]


@torch.inference_mode()
def _decode_chunk(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    config: SamplingConfig,
    stop_token_ids: torch.Tensor,
    stopper: _StopStrings | None,
    seeds: list[int],
    pad_id: int,
    decoder: LeanDecoder | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample `group` completions for each of the (P, Lp) left-padded prompts.

    Returns (completion (P*G, T), completion_mask (P*G, T), finished (P*G,), logprobs (P*G, T)).
    """
    device = ids.device
    num_prompts, prompt_len = ids.shape
    rows_total, steps = num_prompts * group, config.max_new_tokens
    text_config = model.config.get_text_config()
    cache = SlabCache(text_config.num_hidden_layers, rows_total, prompt_len + steps, group)

    positions = (mask.long().cumsum(dim=1) - 1).clamp_(min=0)  # (P, Lp)
    out = model(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=positions,
        **{cache_keyword(model): cache},
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1].repeat_interleave(group, dim=0)  # (N, V)
    next_pos = mask.sum(dim=1).repeat_interleave(group)  # (N,)
    attn = torch.cat(
        [mask.repeat_interleave(group, dim=0), mask.new_ones((rows_total, steps))], dim=1
    )  # (N, Lp + T) bool: prompt mask, then every generated column visible
    forward = _ModelStep(model, cache, attn) if decoder is None else _LeanStep(decoder, cache, attn)

    completion = torch.full((rows_total, steps), pad_id, dtype=torch.long, device=device)
    comp_mask = torch.zeros((rows_total, steps), dtype=torch.bool, device=device)
    logprobs = torch.zeros((rows_total, steps), dtype=torch.float32, device=device)
    finished = torch.zeros(rows_total, dtype=torch.bool, device=device)
    rows = torch.arange(rows_total, device=device)  # original row of each active row
    done = torch.zeros(rows_total, dtype=torch.bool, device=device)
    sync_every = 1 if device.type == "cpu" or stopper is not None else COMPACT_EVERY

    noise = None if config.temperature == 0 else _PromptNoise(seeds, group, device)
    for step in range(steps):
        uniform = None if noise is None else noise.uniforms(rows)
        tokens, lp = sample_next(logits, config, uniform)  # (b,), (b,)
        live = ~done
        completion[rows, step] = torch.where(live, tokens, pad_id)
        comp_mask[rows, step] = live
        logprobs[rows, step] = torch.where(live, lp, 0.0)
        stopped = live & torch.isin(tokens, stop_token_ids)
        if stopper is not None:
            check = (live & ~stopped).nonzero().squeeze(1)
            if check.numel():
                stopped[check] = stopper.hits(completion, rows[check], step)
        finished[rows] |= stopped
        done |= stopped
        if step == steps - 1:
            break
        if (step + 1) % sync_every == 0:
            num_done = int(done.sum())
            if num_done == done.numel():
                break
            if (step + 1) % COMPACT_EVERY == 0 and num_done * 8 >= done.numel():
                keep = (~done).nonzero().squeeze(1)  # (b',)
                forward.select(keep, prompt_len + step)
                rows, tokens, next_pos, done = rows[keep], tokens[keep], next_pos[keep], done[keep]
        logits = forward(tokens, next_pos, prompt_len + step + 1)  # (b, V)
        next_pos = next_pos + 1
    return completion, comp_mask, finished, logprobs


def generate_builtin(
    policy: Policy,
    prompt_ids: list[list[int]],
    num_samples: int,
    config: SamplingConfig,
    *,
    seeds: list[int],
    batch_size: int | None = None,
    lean: bool = True,
) -> Rollouts:
    """Sample with the built-in KV-cache sampler; see `rlino.rollout.generate` for the contract.

    `seeds`: one per prompt; a prompt's samples depend on its seed alone.

    Returns CPU tensors. Prompts are decoded in chunks of whole prompts so that at most
    `batch_size` rows run at once (at least one prompt's samples per chunk). Decode steps use
    `LeanDecoder` where the architecture allows (`lean=False` forces the model's own forward).
    """
    model, tokenizer, device = policy.model, policy.tokenizer, policy.device
    pad_id = int(tokenizer.pad_token_id)
    padded, pad_mask = left_pad(prompt_ids, pad_id)
    ids = torch.tensor(padded, dtype=torch.long, device=device)  # (P, Lp)
    mask = torch.tensor(pad_mask, dtype=torch.bool, device=device)  # (P, Lp)
    num_prompts = ids.shape[0]
    per_chunk = num_prompts if batch_size is None else max(1, batch_size // num_samples)
    stops = torch.tensor(stop_ids(policy, config), dtype=torch.long, device=device)
    stopper = _StopStrings(tokenizer, config.stop_strings) if config.stop_strings else None

    was_training = model.training
    model.eval()
    decoder = None
    if lean:
        with torch.inference_mode():  # the fused weights must not join an autograd graph
            rows = min(num_prompts, per_chunk) * num_samples
            decoder = lean_decoder(model, ids.shape[1] + config.max_new_tokens, rows)
    try:
        parts = [
            _decode_chunk(
                model,
                ids[i : i + per_chunk],
                mask[i : i + per_chunk],
                num_samples,
                config,
                stops,
                stopper,
                seeds[i : i + per_chunk],
                pad_id,
                decoder,
            )
            for i in range(0, num_prompts, per_chunk)
        ]
    finally:
        model.train(was_training)

    # Clone outside inference mode so callers may use these tensors in autograd (e.g. as indices).
    completion, comp_mask, finished, logprobs = (
        torch.cat([p[k] for p in parts]).cpu().clone() for k in range(4)
    )
    width = max(1, int(comp_mask.sum(dim=1).max()))
    return Rollouts(
        prompt_ids=ids.repeat_interleave(num_samples, dim=0).cpu().clone(),
        prompt_mask=mask.repeat_interleave(num_samples, dim=0).cpu().clone(),
        completion_ids=completion[:, :width].contiguous(),
        completion_mask=comp_mask[:, :width].contiguous(),
        finished=finished,
        prompt_index=torch.arange(num_prompts).repeat_interleave(num_samples),
        logprobs=logprobs[:, :width].contiguous(),
        stop_strings=config.stop_strings,
    )
