"""Monte-Carlo step credit (VinePPO, Kazemnejad et al. 2024, arXiv 2410.01679): method `vine`.

The paper rlino is built around (arXiv 2505.13697) calls outcome-reward post-training a degenerate
MDP because one terminal reward is spread evenly over every token. VinePPO keeps the terminal
reward but gives each reasoning *step* its own advantage, from Monte-Carlo values of the partial
completions before and after it. `vine` is that credit as one more weighting of the one loop:

- a completion is cut into steps where the task says they end (`Task.step_ends`: lines by default,
  equations for Countdown), mapped to token positions by `token_step_ends`;
- V(prefix) is the mean reward of K fresh continuations of prompt + prefix (`method.mc_samples`,
  default 4), drawn from the current policy with what is left of the token budget; V of the empty
  prefix (the prompt) is estimated the same way, once per prompt, as VinePPO does (not taken from
  the group's own rewards, so vine needs no group and works with G = 1); after the last step the
  value is the sample's own reward;
- the advantage of step t is V(after t) - V(before t) (gamma 1, no reward before the end), and
  every token of the step carries it; the loss is GRPO's clipped surrogate, with the optional k3
  KL to a reference (`method.beta`).

All the batch's prefixes go to the sampler in one call (one generate; each prefix's prefill is
shared by its K draws), and identical prefixes of one group (same prompt, same tokens: one state)
are estimated once. With one step per completion the weight is R - V(prompt): REINFORCE with a
Monte-Carlo baseline. What it costs: (step boundaries per completion + 1/G) x K continuations per
sample, each on average shorter than a completion; `train/mc_tokens` and `time/mc_s` log it (on
the tiny Countdown base: about 5 states per completion, 12x the rollout tokens at K = 4).

Differences from VinePPO as published: advantages are not whitened over the batch (whitening
recentres and rescales them; AdamW's step hardly depends on the scale, and unwhitened they keep
the REINFORCE identity above exact), and there is no per-token KL penalty in the reward (the k3
KL is in the loss, as in GRPO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Protocol

from rlino.methods import Method, MethodParams, ScoredBatch, register_method

if TYPE_CHECKING:
    from torch import Tensor

    from rlino.tasks import Task


class StepSampler(Protocol):
    """What `vine` needs from its sampler: step boundaries and scored continuations."""

    def step_ends(self, k: int) -> Sequence[int]:
        """Token counts where sample k's steps end, increasing, each in 1..length - 1."""
        ...

    def continuation_scores(
        self, rows: Sequence[int], prefixes: Sequence[Sequence[int]], k: int
    ) -> tuple[Tensor, Tensor]:
        """(len(rows), k) rewards and correctness of k continuations of each prompt + prefix."""
        ...


# ---- step boundaries on tokens ---------------------------------------------------------------


def decoded_lengths(tokenizer: Any, ids: Sequence[int]) -> Callable[[int], int]:
    """A function j -> len(decode(ids[:j])), the characters the first j tokens decode to.

    When the tokens decoded one by one concatenate to the whole decode (word-level, character and
    most byte-level BPE vocabularies on ASCII), the lengths are running sums of one batch decode;
    otherwise (SentencePiece's leading space, a character split over byte tokens) each j decodes
    its prefix, exact at any tokenizer's rules.
    """
    ids = list(ids)
    pieces = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=True)
    if "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True):
        sums = [0]
        for piece in pieces:
            sums.append(sums[-1] + len(piece))
        return sums.__getitem__
    cache: dict[int, int] = {}

    def length(j: int) -> int:
        if j not in cache:
            cache[j] = len(tokenizer.decode(ids[:j], skip_special_tokens=True))
        return cache[j]

    return length


def token_step_ends(tokenizer: Any, ids: Sequence[int], char_ends: Sequence[int]) -> list[int]:
    """Step ends in characters (of the decoded completion) as token counts.

    The rule: a step ends with the token that completes its last character, i.e. at the fewest
    tokens whose decode reaches the boundary. A token that straddles a boundary (".\\n", ", " or
    "\\nThe" in one token) so belongs to the step it finishes, and the next step starts with the
    token after it. Boundaries that fall in the same token merge; one that only the last token
    reaches is the completion's end, no boundary. Binary search over prefix lengths: about
    log2(length) decodes per boundary on tokenizers that need them.
    """
    length = decoded_lengths(tokenizer, ids)
    out: list[int] = []
    for char_end in char_ends:
        lo, hi = 1, len(ids)
        while lo < hi:  # the smallest j with length(j) >= char_end
            mid = (lo + hi) // 2
            if length(mid) >= char_end:
                hi = mid
            else:
                lo = mid + 1
        if lo < len(ids) and (not out or lo > out[-1]):
            out.append(lo)
    return out


def completion_step_ends(task: Task, tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Token counts where the steps of completion `ids` end, by the task's own step rule."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return token_step_ends(tokenizer, ids, task.step_ends(text))


# ---- the weighting ----------------------------------------------------------------------------


def _checked_ends(ends: Sequence[int], length: int, k: int) -> list[int]:
    out = [int(e) for e in ends]
    if any(not 0 < e < length for e in out) or any(a >= b for a, b in pairwise(out)):
        raise ValueError(f"step ends of sample {k} must increase within 1..{length - 1}, got {out}")
    return out


def step_values(
    batch: ScoredBatch, params: MethodParams, sampler: StepSampler
) -> tuple[list[list[int]], list[list[float]]]:
    """Each sample's step ends (token counts) and its chain of values V_0 .. V_S.

    V_0 is the prompt's Monte-Carlo value, V_t (0 < t < S) the value after step t, and V_S the
    sample's own reward (S steps: len(ends) + 1). Every distinct state of the batch is estimated
    in one `continuation_scores` call with `params.mc_samples` draws; values compare what the
    weighting compares (`weight_on`: the shaped reward, or binary success).
    """
    import torch

    n_prompts, group = batch.rewards.shape
    samples = [batch.completion(k) for k in range(n_prompts * group)]
    ends = [_checked_ends(sampler.step_ends(k), len(s), k) for k, s in enumerate(samples)]
    states: dict[tuple[int, tuple[int, ...]], int] = {}
    rows: list[int] = []
    prefixes: list[tuple[int, ...]] = []

    def state(k: int, prefix: tuple[int, ...]) -> int:
        key = (k // group, prefix)  # one state per (prompt, prefix)
        if key not in states:
            states[key] = len(rows)
            rows.append(k)
            prefixes.append(prefix)
        return states[key]

    chains = [[state(k, s[:e]) for e in (0, *ends[k])] for k, s in enumerate(samples)]
    rewards, correct = sampler.continuation_scores(rows, prefixes, params.mc_samples)
    estimates = correct if params.weight_on == "correct" else rewards  # (S, K)
    values = estimates.to(torch.float64).mean(dim=1).tolist()  # (S,)
    final = batch.rewards.reshape(-1).tolist()  # (N,)
    return ends, [[*(values[i] for i in chain), final[k]] for k, chain in enumerate(chains)]


def step_credit(batch: ScoredBatch, params: MethodParams, sampler: Any = None) -> Tensor:
    """vine's weights (N, T): each token gets V(after its step) - V(before it); padding 0."""
    import torch

    if sampler is None or not hasattr(sampler, "step_ends"):
        raise ValueError(
            "method 'vine' estimates values by sampling: weigh it with a sampler that has "
            "step_ends and continuation_scores (rlino.step.ContinuationSampler)"
        )
    if batch.completion_ids is None or batch.completion_mask is None:
        raise ValueError("method 'vine' needs the completions' token ids and mask")
    ends, values = step_values(batch, params, sampler)
    weights = torch.zeros(batch.completion_ids.shape, dtype=torch.float64)  # (N, T)
    for k, (row_ends, chain) in enumerate(zip(ends, values, strict=True)):
        cols = batch.completion_mask[k].nonzero().squeeze(1)  # (L,) real token columns
        bounds = [0, *row_ends, cols.numel()]
        for t in range(len(bounds) - 1):
            weights[k, cols[bounds[t] : bounds[t + 1]]] = chain[t + 1] - chain[t]
    return weights.to(batch.rewards.dtype)


register_method(
    Method(
        "vine",
        "VinePPO-style step credit: Monte-Carlo values at step boundaries, clipped ratio",
        step_credit,
        surrogate="clipped",
        uses_kl=True,
        group_relative=False,
        per_token=True,
        knobs=("mc_samples",),
    )
)
