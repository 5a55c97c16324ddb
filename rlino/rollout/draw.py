"""Drawing one token per row from logits: two given uniforms per row, one pass over the logits.

`sample_next` applies temperature, top-k and top-p and returns the token with its log-prob under
the distribution actually sampled from; `draw` and `sample_softmax` are the inverse-CDF draws
behind it (see their docstrings for why not `torch.multinomial`). The caller supplies the random
numbers, (B, 2) uniforms, so that each row's draws can come from its own prompt's stream and a
sample does not depend on which other rows share its batch (`rlino.rollout.sampler`).
"""

from __future__ import annotations

import torch

from rlino.rollout import SamplingConfig


def sample_next(
    logits: torch.Tensor, config: SamplingConfig, uniform: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from (B, V) logits; return (tokens (B,), log-probs (B,)).

    uniform: (B, 2) in [0, 1), the row's two random numbers (unused, may be None, when greedy).

    The log-prob is under the distribution actually sampled from (temperature, top-k and top-p
    applied, renormalised). Greedy (temperature 0) reports the log-prob under the raw softmax.
    """
    z = logits.float()  # (B, V)
    if config.temperature == 0:
        tokens = z.argmax(dim=-1)  # (B,)
        return tokens, z.gather(1, tokens[:, None]).squeeze(1) - z.logsumexp(dim=-1)
    if not 0 < config.top_k < z.shape[-1] and config.top_p >= 1.0:
        return sample_softmax(z, config.temperature, _given(uniform))
    if config.temperature != 1.0:
        z = z / config.temperature
    if 0 < config.top_k < z.shape[-1]:
        kth = z.topk(config.top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if config.top_p < 1.0:
        z = _top_p_filter(z, config.top_p)
    lse = z.logsumexp(dim=-1, keepdim=True)  # (B, 1)
    tokens = draw(z.sub(lse).exp_(), _given(uniform))  # (B,)
    return tokens, (z.gather(1, tokens[:, None]) - lse).squeeze(1)


def _given(uniform: torch.Tensor | None) -> torch.Tensor:
    if uniform is None:
        raise ValueError("sampling at temperature > 0 needs uniforms")
    return uniform


DRAW_BLOCK = 256
"""vocabulary block size of the two-level inverse-CDF draw"""


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of (B, V) non-negative weights, with probability proportional to them.

    Inverse CDF with two uniforms per row: first a block of `DRAW_BLOCK` tokens by the blocks'
    masses, then a token inside it. Why not `torch.multinomial` or an exponential race
    (`argmax p / Exp(1)`): both cost V random numbers per row, which for a 49k vocabulary take as
    long as the lm_head matmul; here it is two per row. Why two levels: a float32 running sum over
    the whole vocabulary absorbs tokens below its rounding step (~3e-8 of the total, lost mass up
    to V times that); over 256-token blocks, and then within one block, the error stays about
    1e-5 of the mass at most. Tokens of weight 0 (masked by top-k / top-p) are never drawn.
    """
    rows, vocab = probs.shape
    pad = -vocab % DRAW_BLOCK
    blocks = torch.nn.functional.pad(probs, (0, pad)).view(rows, -1, DRAW_BLOCK)  # (B, nb, blk)
    uniform = uniform.to(probs.dtype)  # (B, 2)
    block = _inverse_cdf(blocks.sum(dim=-1), uniform[:, :1])  # (B, 1)
    inner = blocks.gather(1, block[:, :, None].expand(-1, -1, DRAW_BLOCK)).squeeze(1)  # (B, blk)
    return (block * DRAW_BLOCK + _inverse_cdf(inner, uniform[:, 1:])).squeeze(1)  # (B,)


SAMPLE_CHUNK = 16 * DRAW_BLOCK
"""vocabulary columns per pass of `sample_softmax` (64 rows x 4096 fp32 = 1 MB, about an L2 cache)"""


def sample_softmax(
    logits: torch.Tensor, temperature: float, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(logits / temperature); return (tokens, log-probs).

    The same two-level inverse-CDF draw as `draw` (the same two uniforms per row, blocks of
    `DRAW_BLOCK`), but the (B, V) logits are read once, in column chunks small enough to stay in
    cache: each chunk's maximum and its blocks' masses exp(z - chunk max) are kept, the masses are
    rescaled to the global maximum afterwards, and only the chosen block is exponentiated again.
    Why: with a 49k vocabulary at batch 64 the logits are 12.6 MB, and the plain softmax path
    (max, subtract, exp, sum, then exp again for the probabilities) streams them from memory about
    eight times per token, which cost more than the lm_head matmul itself.
    """
    rows, vocab = logits.shape
    inv_t = 1.0 / temperature
    chunk_max, masses = [], []
    for start in range(0, vocab, SAMPLE_CHUNK):
        z = logits[:, start : start + SAMPLE_CHUNK].float()  # (B, C)
        if inv_t != 1.0:
            z = z * inv_t
        peak = z.amax(dim=1, keepdim=True)  # (B, 1)
        weights = (z - peak).exp_()  # (B, C)
        pad = -weights.shape[1] % DRAW_BLOCK
        if pad:
            weights = torch.nn.functional.pad(weights, (0, pad))
        masses.append(weights.view(rows, -1, DRAW_BLOCK).sum(dim=-1))  # (B, C / blk)
        chunk_max.append(peak)
    if len(masses) == 1:
        top, block_mass = chunk_max[0], masses[0]  # (B, 1), (B, blocks)
    else:
        peaks = torch.cat(chunk_max, dim=1)  # (B, chunks)
        top = peaks.amax(dim=1, keepdim=True)  # (B, 1)
        block_mass = torch.cat(masses, dim=1)  # (B, blocks)
        blocks = torch.arange(block_mass.shape[1], device=logits.device)
        owner = blocks // (SAMPLE_CHUNK // DRAW_BLOCK)  # (blocks,) chunk of each block
        block_mass *= (peaks - top).exp_()[:, owner]
    block = _inverse_cdf(block_mass, uniform[:, :1])  # (B, 1)
    columns = block * DRAW_BLOCK + torch.arange(DRAW_BLOCK, device=logits.device)  # (B, blk)
    inside = columns < vocab
    z = logits.gather(1, columns.clamp(max=vocab - 1)).float() * inv_t  # (B, blk)
    inner = (z - top).exp_().masked_fill_(~inside, 0.0)  # (B, blk)
    pick = _inverse_cdf(inner, uniform[:, 1:])  # (B, 1)
    log_total = top + block_mass.sum(dim=1, keepdim=True).log()  # (B, 1) logsumexp(logits / T)
    tokens = (block * DRAW_BLOCK + pick).squeeze(1)  # (B,)
    return tokens, (z.gather(1, pick) - log_total).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of the first running sum of (B, n) `weights` above uniform (B, 1) x total.

    The target is kept strictly below the total, so the index found always has a positive weight.
    """
    cdf = weights.cumsum(dim=-1)  # (B, n)
    total = cdf[:, -1:]  # (B, 1)
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)  # (B, 1)


def _top_p_filter(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the smallest set whose probability mass reaches top_p."""
    sorted_z, order = z.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_z.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    sorted_z = sorted_z.masked_fill(mass_before >= top_p, float("-inf"))  # top-1 always kept
    return torch.empty_like(z).scatter_(1, order, sorted_z)
