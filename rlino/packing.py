"""Score a micro-batch without padding: sequence packing and prompt-prefix sharing (`optim.packing`).

The padded layout (`rlino.update.batch_logprobs`) runs rows x (longest prompt + longest
completion) tokens. Completions end at very different lengths, and the G samples of one prompt
repeat that prompt G times, so much of that work is padding or repeated. Two other layouts give
the same log-probs and the same gradient:

- `pack`: the rows' real tokens back to back, position ids restarting at 0 for each row (the
  padded path's cumsum(attention_mask) - 1), and no attention mask: transformers reads the
  restarts as packed sequences (`masking_utils.find_packed_sequence_indices`) and confines
  attention to each row (block-diagonal causal) in each of its attention implementations (sdpa,
  eager and flex build that mask, sliding windows included; flash attention runs its varlen
  kernel).
- `prefix`: rows with identical (unpadded) prompt tokens share one copy of the prompt: [prompt,
  completion 1, completion 2, ...], each completion's positions going on from the prompt's
  length, and an explicit 4D mask (a tree) lets each completion see the prompt and its own
  earlier tokens only. Each row's first completion token is predicted from the prompt's last
  hidden state, so every completion's gradient flows into the one prompt computation and sums
  there exactly as over G separate copies.

Sequences, not one sequence: sdpa and eager attention compute every query-key pair of a
sequence, masked or not, so a whole micro-batch of T tokens in one sequence costs T^2 in
attention where the padded rows cost rows x width^2 (with the tiny model on a CPU, one packed
sequence per micro-batch was several times slower than padding). The units (a row; a prompt with its completions, cut where it
gets long) are therefore packed first fit into B sequences of at most SPAN padded widths,
stacked as a (B, S) batch, the end of each filled with a segment that is never read. Flash
attention needs one sequence (its varlen path reads one row of position ids) and pays only for
the pairs it attends, so it gets one.

Only what is needed reaches the output layer: the hidden states that predict real completion
tokens. `prefix` passes a ready-made mask, which sdpa and eager attention take as it is (sdpa a
boolean one, eager an additive one), in models whose layers all use full attention; flash and
flex attention, sliding windows and other layer kinds are refused with a UserError. Both modes
refuse models whose code is not part of transformers (their forward may build masks its own
way).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlino.errors import UserError
from rlino.policy import decoder_hidden, head_stats

if TYPE_CHECKING:
    from rlino.update import TokenBatch

PREFIX_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take `prefix`'s ready-made 4D mask as it is."""
PACK_LAYER_TYPES = {"full_attention", "sliding_attention"}
"""Layer kinds whose masks transformers confines to each packed row."""
DENSE_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take several packed sequences at once (`sequence_span`)."""
SPAN = 2
"""A packed sequence may be this many padded widths long (see `sequence_span`)."""


@dataclass
class RowShapes:
    """What the layouts need of each row of a micro-batch, all on the CPU."""

    rows: torch.Tensor
    """(n,) the rows' indices into the batch"""
    prompt_mask: torch.Tensor
    """(n, start) bool, which prompt columns of each row are real tokens"""
    prompts: list[tuple[int, ...]]
    """each row's prompt tokens without padding (rows with equal tuples share a prompt)"""
    completion_lens: list[int]
    """each row's number of real completion tokens"""


def row_shapes(batch: TokenBatch, rows: torch.Tensor) -> RowShapes:
    """Indices, prompt tokens and masks of `rows`, in one device-to-host copy.

    Everything the layouts read of the rows travels as one tensor: a copy off an accelerator
    waits for the work queued before it, so a micro-batch should pay for one, not one per field.
    """
    start, index = batch.start, rows.to(batch.ids.device, torch.long)
    host = torch.cat(
        [index[:, None], batch.ids[index, :start].long(), batch.attn[index].long()], dim=1
    ).cpu()
    ids, attn = host[:, 1 : start + 1], host[:, start + 1 :].bool()
    prompt_mask = attn[:, :start]
    prompts = [tuple(ids[i][prompt_mask[i]].tolist()) for i in range(len(host))]
    return RowShapes(host[:, 0], prompt_mask, prompts, attn[:, start:].sum(dim=1).tolist())


def _group_keys(shapes: RowShapes, share_prompts: bool) -> list[object]:
    """One key per row; rows with the same key are laid out behind one copy of their prompt."""
    if share_prompts:
        return list(shapes.prompts)
    return list(range(len(shapes.prompts)))


def packed_slices(
    batch: TokenBatch, rows: torch.Tensor, max_rows: int, max_tokens: int, share_prompts: bool
) -> Iterator[torch.Tensor]:
    """Consecutive slices of `rows`, at most `max_rows` rows whose tokens fit `max_tokens`.

    A slice's tokens are its rows' real prompt and completion tokens, a prompt the rows share
    counted once: what `packed_logprobs` runs, except for the filler that ends each packed
    sequence and the extra prompt copies of a group cut into several units. 0 = no token cap;
    a single row always forms a slice, however long.
    """
    shapes = row_shapes(batch, rows)
    keys = _group_keys(shapes, share_prompts)
    first, tokens, seen = 0, 0, set()
    for i, (prompt, completion_len, key) in enumerate(
        zip(shapes.prompts, shapes.completion_lens, keys, strict=True)
    ):
        cost = completion_len + (0 if key in seen else len(prompt))
        count = i - first + 1
        over_tokens = max_tokens and tokens + cost > max_tokens
        if count > 1 and (count > max_rows or over_tokens):
            yield rows[first:i]
            first, tokens, seen = i, 0, set()
            cost = completion_len + len(prompt)
        tokens += cost
        seen.add(key)
    if keys:
        yield rows[first:]


def packed_tokens(batch: TokenBatch, rows: torch.Tensor, share_prompts: bool) -> int:
    """The tokens `packed_slices` counts for `rows` as one slice."""
    shapes = row_shapes(batch, rows)
    keys = _group_keys(shapes, share_prompts)
    prompts = {key: len(p) for key, p in zip(keys, shapes.prompts, strict=True)}
    return sum(prompts.values()) + sum(shapes.completion_lens)


@dataclass
class Unit:
    """A prompt copy and the rows whose completions follow it, kept together in one sequence."""

    prompt: torch.Tensor
    """(p,) the prompt's indices into the flattened (N, L) `TokenBatch.ids`"""
    rows: list[int]
    """the micro-batch rows whose completions follow the prompt, in order"""
    length: int
    """prompt and completions, in tokens"""


def build_units(
    batch: TokenBatch, shapes: RowShapes, share_prompts: bool, capacity: int | None
) -> list[Unit]:
    """The micro-batch's units: each row alone, or each prompt with the rows that share it.

    A group whose prompt and completions come to more than `capacity` tokens (None = no limit)
    is cut into several units, each with its own prompt copy and at least one completion.
    """
    length = batch.ids.shape[1]
    members: dict[object, list[int]] = {}
    for i, key in enumerate(_group_keys(shapes, share_prompts)):
        members.setdefault(key, []).append(i)
    units = []
    for rows_of_group in members.values():
        first = rows_of_group[0]
        prompt = shapes.rows[first] * length + shapes.prompt_mask[first].nonzero().squeeze(1)
        if len(prompt) == 0:
            raise ValueError("a row with an empty prompt has no context for its first token")
        unit = Unit(prompt, [], len(prompt))
        for i in rows_of_group:
            size = shapes.completion_lens[i]
            if unit.rows and capacity is not None and unit.length + size > capacity:
                units.append(unit)
                unit = Unit(prompt, [], len(prompt))
            unit.rows.append(i)
            unit.length += size
        units.append(unit)
    return units


def fill_bins(units: list[Unit], capacity: int | None) -> list[list[Unit]]:
    """Units into sequences of at most `capacity` tokens (or the longest unit), first fit from
    the longest unit down; None = all of them in one sequence, in order."""
    if capacity is None:
        return [units]
    capacity = max([capacity] + [u.length for u in units])
    bins: list[list[Unit]] = []
    used: list[int] = []
    for unit in sorted(units, key=lambda u: -u.length):
        b = next((b for b, n in enumerate(used) if n + unit.length <= capacity), len(bins))
        if b == len(bins):
            bins.append([])
            used.append(0)
        bins[b].append(unit)
        used[b] += unit.length
    return bins


@dataclass
class Layout:
    """A micro-batch as B packed sequences of S tokens (all tensors on the CPU).

    The tokens of a sequence past its units are filler: a segment of their own, never read.
    """

    source: torch.Tensor
    """(B, S) each token's index into the flattened (N, L) `TokenBatch.ids`, -1 for filler"""
    positions: torch.Tensor
    """(B, S) its position id: the one it has in its own row (filler counts from 0 again)"""
    group: torch.Tensor
    """(B, S) which unit (prompt copy) it belongs to; filler forms one more"""
    branch: torch.Tensor
    """(B, S) -1 for prompt tokens and filler, else the micro-batch row whose completion it is"""
    token_at: torch.Tensor
    """(M,) where each real completion token sits in the flattened (B * S) sequences"""
    predictor_at: torch.Tensor
    """(M,) where the hidden state that predicts it sits (the prompt's last for the first one)"""
    out_row: torch.Tensor
    """(M,) its row in the (n, width) output"""
    out_col: torch.Tensor
    """(M,) its column there (its index in the completion)"""
    width: int
    """the longest completion among the rows"""


def build_layout(
    batch: TokenBatch, rows: torch.Tensor, share_prompts: bool, span: int | None = None
) -> Layout:
    """Lay `rows` out as packed sequences of at most `span` x the padded layout's width (the
    longest prompt plus the longest completion); None: all in one sequence.

    Each unit (`build_units`) is its prompt, then each of its rows' completions, positions going
    on from the prompt's length. Without `share_prompts` every row is its own unit, so the
    sequences hold the rows' real tokens back to back. Why sequences of bounded length: sdpa
    and eager attention compute every query-key pair of a sequence, masked or not, so one
    sequence of T tokens costs T^2 where the padded rows cost rows x width^2.
    """
    shapes = row_shapes(batch, rows)
    completion_lens = shapes.completion_lens
    widest = max(map(len, shapes.prompts)) + max(completion_lens)
    capacity = None if span is None else span * widest
    bins = fill_bins(build_units(batch, shapes, share_prompts, capacity), capacity)
    seq_len = max(sum(u.length for u in units) for units in bins)
    start = batch.start
    source, positions, group, branch = [], [], [], []
    token_at, predictor_at, out_row, out_col = [], [], [], []
    unit_id = 0
    row_ids = shapes.rows
    for b, units in enumerate(bins):
        offset = b * seq_len  # flat index of this sequence's first token
        for unit in units:
            prompt_len = len(unit.prompt)
            source.append(unit.prompt)
            positions.append(torch.arange(prompt_len))
            group.append(torch.full((prompt_len,), unit_id))
            branch.append(torch.full((prompt_len,), -1))
            last_prompt = offset + prompt_len - 1
            offset += prompt_len
            for i in unit.rows:
                k = torch.arange(completion_lens[i])
                source.append(row_ids[i] * batch.ids.shape[1] + start + k)
                positions.append(prompt_len + k)
                group.append(torch.full_like(k, unit_id))
                branch.append(torch.full_like(k, i))
                token_at.append(offset + k)
                predictor_at.append(torch.where(k == 0, last_prompt, offset + k - 1))
                out_row.append(torch.full_like(k, i))
                out_col.append(k)
                offset += len(k)
            unit_id += 1
        filler = (b + 1) * seq_len - offset
        source.append(torch.full((filler,), -1))
        positions.append(torch.arange(filler))
        group.append(torch.full((filler,), unit_id))
        branch.append(torch.full((filler,), -1))
        unit_id += 1
    shape = (len(bins), seq_len)
    return Layout(
        source=torch.cat(source).view(shape),
        positions=torch.cat(positions).view(shape),
        group=torch.cat(group).view(shape),
        branch=torch.cat(branch).view(shape),
        token_at=torch.cat(token_at),
        predictor_at=torch.cat(predictor_at),
        out_row=torch.cat(out_row),
        out_col=torch.cat(out_col),
        width=max(completion_lens),
    )


def tree_mask(layout: Layout, device: torch.device) -> torch.Tensor:
    """(B, 1, S, S) bool, True where query i may attend key j of the same sequence.

    j must come no later than i in the same unit, and be a prompt token or a token of i's own
    completion: the prompt sees itself causally, each completion the prompt and its own past.
    """
    group, branch = layout.group.to(device), layout.branch.to(device)
    index = torch.arange(group.shape[1], device=device)
    allowed = group[:, :, None] == group[:, None, :]  # (B, S, S)
    allowed &= index[:, None] >= index[None, :]
    allowed &= (branch[:, None, :] < 0) | (branch[:, :, None] == branch[:, None, :])
    return allowed[:, None]


def sequence_span(model: torch.nn.Module) -> int | None:
    """How long a packed sequence may be, in padded widths (`build_layout`). SPAN for attention
    that computes every pair of a sequence: short rows share a sequence and a prompt has room
    for several completions, while the attention stays within about SPAN x what the padded
    rows cost. None (one sequence) for flash attention, whose varlen kernel pays only for the
    pairs it attends, and which reads packed sequences from one row of position ids only."""
    if model.config.get_text_config()._attn_implementation not in DENSE_ATTENTION:
        return None
    return SPAN


def check_model(model: torch.nn.Module, mode: str) -> None:
    """UserError unless `model` scores correctly in packing mode `mode` (see the module docstring)."""
    config = model.config.get_text_config()
    name = type(config).__name__
    if not type(config).__module__.startswith("transformers."):
        raise UserError(
            f"optim.packing {mode} needs a model architecture built into transformers, and "
            f"{name} comes from {type(config).__module__} (use optim.packing none)"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if mode == "pack" and not layer_types <= PACK_LAYER_TYPES:
        raise UserError(
            f"optim.packing pack needs full or sliding-window attention in every layer; {name} "
            f"has {', '.join(sorted(layer_types - PACK_LAYER_TYPES))} (use optim.packing none)"
        )
    if mode != "prefix":
        return
    implementation = config._attn_implementation
    if implementation not in PREFIX_ATTENTION:
        raise UserError(
            f"optim.packing prefix needs sdpa or eager attention, not {implementation} "
            "(use optim.packing pack, which works with any)"
        )
    windowed = getattr(config, "sliding_window", None) is not None
    if layer_types != {"full_attention"} or windowed:
        raise UserError(
            f"optim.packing prefix needs full attention in every layer; {name} has sliding-window "
            "or other layers (use optim.packing pack)"
        )


def model_layout(
    model: torch.nn.Module, batch: TokenBatch, rows: torch.Tensor, mode: str
) -> Layout:
    """The layout `packed_logprobs` runs `rows` through `model` in (`mode` pack or prefix)."""
    return build_layout(batch, rows, mode == "prefix", sequence_span(model))


def packed_logprobs(
    model: torch.nn.Module, batch: TokenBatch, rows: torch.Tensor, mode: str
) -> torch.Tensor:
    """Completion log-probs of `rows`, (n, width), as `rlino.update.batch_logprobs` gives them.

    `mode` is pack or prefix. width is the longest completion among the rows; columns past a
    row's completion are 0. Differentiable.
    """
    check_model(model, mode)
    device = batch.ids.device
    layout = model_layout(model, batch, rows, mode)
    source = layout.source.to(device)
    ids = batch.ids.reshape(-1)[source.clamp(min=0)]  # (B, S); filler reads any real token
    inputs: dict[str, object] = {
        "input_ids": ids,
        "position_ids": layout.positions.to(device),
        "attention_mask": None,  # pack: transformers sees the position restarts
        "use_cache": False,
    }
    if mode == "prefix":
        allowed = tree_mask(layout, device)
        if model.config.get_text_config()._attn_implementation == "eager":
            # additive, in fp32: adding 0 leaves scores of any dtype exact, and softmax is fp32
            blocked = torch.finfo(torch.float32).min
            allowed = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, blocked)
        inputs["attention_mask"] = allowed
    hidden = decoder_hidden(model, inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (B * S, D)
    predictors = hidden[layout.predictor_at.to(device)]  # (M, D)
    targets = ids.reshape(-1)[layout.token_at.to(device)]  # (M,)
    logp, _ = head_stats(
        model, predictors, targets, temperature=batch.temperature, with_entropy=False
    )
    out = torch.zeros((len(rows), layout.width), dtype=logp.dtype, device=device)
    where = (layout.out_row.to(device), layout.out_col.to(device))
    return out.index_put(where, logp)  # (n, width)
