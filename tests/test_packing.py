"""Packed and prefix-sharing layouts (`optim.packing`, rlino.packing) against the padded one.

The padded layout is the reference: on a ragged batch (prompts of several lengths, G samples per
prompt, completions from 1 token up) the packed layouts must give the same log-probs and, through
the real loss and micro-batched accumulation, the same gradient, on the tiny random Llama of
conftest with sdpa and eager attention, with LoRA, in bf16, sharded by FSDP2 (one rank), and in
a short training run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import tiny_config

import rlino.packing
from rlino.config import load_config
from rlino.errors import UserError
from rlino.methods import MethodParams, resolve
from rlino.packing import (
    Unit,
    build_layout,
    build_units,
    check_model,
    fill_bins,
    packed_tokens,
    row_shapes,
    tree_mask,
)
from rlino.train import train
from rlino.update import (
    MicroBatching,
    TokenBatch,
    accumulate_gradients,
    batch_logprobs,
    flat_grad,
    frozen_logprobs,
    micro_slices,
    tokens_computed,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0
PROMPT_A, PROMPT_B, PROMPT_C = [5, 6, 7], [5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]
"""B starts with A (a different prompt all the same), C is the longest"""


def make_batch(
    prompts: list[list[int]],
    completion_lens: list[int],
    *,
    vocab: int = 60,
    seed: int = 0,
    temperature: float = 1.0,
) -> TokenBatch:
    """Prompts left-padded, random completions of the given lengths right-padded (as rollouts)."""
    gen = torch.Generator().manual_seed(seed)
    start, width = max(map(len, prompts)), max(completion_lens) + 2  # 2 columns all padding
    ids = torch.full((len(prompts), start + width), PAD, dtype=torch.long)
    attn = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (prompt, c) in enumerate(zip(prompts, completion_lens, strict=True)):
        ids[i, start - len(prompt) : start] = torch.tensor(prompt)
        ids[i, start : start + c] = torch.randint(3, vocab, (c,), generator=gen)
        attn[i, start - len(prompt) : start + c] = True
    return TokenBatch(ids, attn, attn[:, start:].clone(), start, temperature)


def ragged_batch(seed: int = 0, temperature: float = 1.0) -> TokenBatch:
    """3 prompts x G = 3 samples, one of A's samples away from the others, a 1-token completion."""
    prompts = [PROMPT_A, PROMPT_A, PROMPT_B, PROMPT_B, PROMPT_B, PROMPT_A]
    prompts += [PROMPT_C] * 3
    lens = [5, 1, 12, 3, 7, 9, 2, 11, 4]
    return make_batch(prompts, lens, seed=seed, temperature=temperature)


def load_model(model_dir: Path, attention: str = "sdpa") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attention
    )
    assert model.config._attn_implementation == attention
    return model


# ---- layouts and masks ------------------------------------------------------------------------


def test_prefix_layout_and_tree_mask_by_hand() -> None:
    """Prompt [5 6 7] shared by rows 0 and 2 (completions of 2 and 1 tokens), row 1 alone."""
    batch = make_batch([PROMPT_A, PROMPT_B, PROMPT_A], [2, 1, 1])
    layout = build_layout(batch, torch.arange(3), share_prompts=True)  # one sequence
    # [5 6 7 | row 0's 2 | row 2's 1] [5 6 7 8 | row 1's 1]
    assert layout.positions.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]]
    assert layout.group.tolist() == [[0] * 6 + [1] * 5]
    assert layout.token_at.tolist() == [3, 4, 5, 10]
    assert layout.predictor_at.tolist() == [2, 3, 2, 9]  # the prompt's last for each first token
    assert layout.out_row.tolist() == [0, 0, 2, 1] and layout.out_col.tolist() == [0, 1, 0, 0]
    allowed = tree_mask(layout, torch.device("cpu"))[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],  # row 0's first token
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 1],  # row 2's token: the prompt and itself, not row 0's
        ]
    )
    assert torch.equal(allowed[:6, :6], expected)
    assert not allowed[6:, :6].any() and not allowed[:6, 6:].any()  # the units stay apart
    assert torch.equal(allowed[6:, 6:], torch.ones(5, 5, dtype=torch.int).tril())
    # sequences of at most one padded width (4 + 2): the two units apart, one filler token
    split = build_layout(batch, torch.arange(3), share_prompts=True, span=1)
    assert split.positions.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 4, 0]]
    assert split.source[1, -1] == -1 and split.group[1, -1] not in split.group[1, :-1]
    assert split.token_at.tolist() == [3, 4, 5, 10] and split.predictor_at.tolist() == [2, 3, 2, 9]
    assert torch.equal(tree_mask(split, torch.device("cpu"))[0, 0].int(), expected)
    packed = build_layout(batch, torch.arange(3), share_prompts=False, span=1)
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 0]]
    one = build_layout(batch, torch.arange(3), share_prompts=False)
    assert one.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3]]


def test_units_and_bins() -> None:
    """A group too long for the capacity is cut, each part with its prompt; first fit decreasing."""
    batch = make_batch([PROMPT_A] * 4, [4, 3, 2, 5])
    rows = torch.arange(4)
    shapes = row_shapes(batch, rows)
    units = build_units(batch, shapes, share_prompts=True, capacity=10)
    assert [(u.rows, u.length) for u in units] == [([0, 1], 10), ([2, 3], 10)]
    assert all(torch.equal(u.prompt, units[0].prompt) for u in units)
    assert len(build_units(batch, shapes, share_prompts=True, capacity=None)) == 1
    tiny = build_units(batch, shapes, share_prompts=True, capacity=1)  # one row each
    assert [u.rows for u in tiny] == [[0], [1], [2], [3]]
    lengths = [5, 3, 3, 2, 7]
    bins = fill_bins([Unit(torch.arange(1), [], n) for n in lengths], 8)
    assert [[u.length for u in b] for b in bins] == [[7], [5, 3], [3, 2]]
    assert len(fill_bins([Unit(torch.arange(1), [], n) for n in lengths], None)) == 1


def test_micro_slices_count_the_tokens_that_run() -> None:
    """Rows: A+5, A+2, A+6, B+1, B+3 under a 16-token cap. Padded: 1x8, 2x8 = 16, then 3x9 is
    over; 1x9, then 2x10 is over; 1x5, 2x7 = 14. Packed: 8 + 5 = 13, + 9 is over; 9 + 5 = 14,
    + 7 is over; 7. Prefix (A once): 3 + 5 + 2 + 6 = 16, + 5 is over; 4 + 1 + 3 = 8."""
    batch = make_batch([PROMPT_A] * 3 + [PROMPT_B] * 2, [5, 2, 6, 1, 3])
    rows = torch.arange(5)

    def sizes(packing: str, max_rows: int = 10) -> list[list[int]]:
        cut = MicroBatching(max_rows, 16, packing)
        return [piece.tolist() for piece in micro_slices(batch, rows, cut)]

    assert sizes("none") == [[0, 1], [2], [3, 4]]
    assert sizes("pack") == [[0, 1], [2, 3], [4]]
    assert sizes("prefix") == [[0, 1, 2], [3, 4]]
    assert sizes("prefix", max_rows=2) == [[0, 1], [2, 3], [4]]
    assert packed_tokens(batch, torch.tensor([0, 1, 2]), share_prompts=True) == 16
    assert packed_tokens(batch, torch.tensor([0, 1, 2]), share_prompts=False) == 22
    one = MicroBatching(10, 1, "prefix")  # every row over the cap: one row per slice
    assert [len(p) for p in micro_slices(batch, rows, one)] == [1] * 5
    uncapped = MicroBatching(10, 0, "pack")
    assert [len(p) for p in micro_slices(batch, rows, uncapped)] == [5]


def test_tokens_computed_by_hand() -> None:
    """Rows A+5, A+2, A+6, B+1, B+3 (prompts of 3 and 4 tokens) under a 16-token cap, cut as in
    the test above. Padded: 2 x (3 + 5) + 1 x (3 + 6) + 2 x (4 + 3) = 39. Pack, sequences of at
    most 2 padded widths: [0 1] 8 + 5 = 13 in one sequence (<= 2 x 8); [2 3] 9 + 5 = 14 (<= 2 x
    10); [4] 7: 34. Prefix: [0 1 2] A once, 3 + 5 + 2 + 6 = 16 (<= 2 x 9); [3 4] B once, 4 + 1
    + 3 = 8: 24."""
    from transformers import LlamaConfig

    config = LlamaConfig()
    config._attn_implementation = "sdpa"
    model = SimpleNamespace(config=config)
    batch = make_batch([PROMPT_A] * 3 + [PROMPT_B] * 2, [5, 2, 6, 1, 3])
    rows = torch.arange(5)

    def tokens(
        packing: str, max_rows: int = 10, max_tokens: int = 16, some: torch.Tensor = rows
    ) -> tuple[int, int]:
        return tokens_computed(model, batch, some, MicroBatching(max_rows, max_tokens, packing))

    assert tokens("none") == (39, 3)
    assert tokens("pack") == (34, 3)
    assert tokens("prefix") == (24, 2)
    # a row per slice: its own prompt and completion, whatever the layout
    assert tokens("none", 1) == tokens("pack", 1) == tokens("prefix", 1) == (34, 5)
    # rows 0-2 in one slice, sequences of at most 2 x (3 + 6) = 18 tokens, first fit from the
    # longest: [A+6 | A+5] and [A+2 | 12 filler], 2 x 17; padded 3 x 9
    assert tokens("pack", max_tokens=0, some=rows[:3]) == (34, 1)
    assert tokens("none", max_tokens=0, some=rows[:3]) == (27, 1)
    # one unit (A once) of 3 + 5 + 2 + 6 = 16 fits
    assert tokens("prefix", max_tokens=0, some=rows[:3]) == (16, 1)
    assert tokens("none", some=rows[:0]) == tokens("pack", some=rows[:0]) == (0, 0)


def test_tokens_computed_in_one_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    """As for flash attention: each micro-batch is one sequence, its rows back to back."""
    one_sequence(monkeypatch)
    batch = make_batch([PROMPT_A] * 3, [5, 2, 6])
    cut = MicroBatching(10, 0, "pack")
    assert tokens_computed(SimpleNamespace(), batch, torch.arange(3), cut) == (8 + 5 + 9, 1)


# ---- log-probs and gradients ------------------------------------------------------------------


def one_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lay every micro-batch out as one sequence, as for flash attention."""
    monkeypatch.setattr(rlino.packing, "sequence_span", lambda model: None)


@pytest.mark.parametrize("sequences", ["bounded", "short", "one"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["pack", "prefix"])
def test_packed_logprobs_equal_the_padded_ones(
    tiny_random_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    attention: str,
    mode: str,
    sequences: str,
) -> None:
    """bounded: the default sequences (with pack, several rows in one); short: sequences of one
    padded width, so prefix cuts prompts B and C into 2 and 3 units, each with a prompt copy;
    one: a single sequence (flash attention's layout; with prefix, several prompts in one)."""
    if sequences == "one":
        one_sequence(monkeypatch)
    if sequences == "short":
        monkeypatch.setattr(rlino.packing, "SPAN", 1)
    model = load_model(tiny_random_model_dir, attention).eval()
    batch = ragged_batch(temperature=0.7)
    rows = torch.arange(len(batch))
    with torch.no_grad():
        padded = batch_logprobs(model, batch, rows)
        packed = batch_logprobs(model, batch, rows, mode)
    assert packed.shape == padded.shape == (9, 12)
    mask = batch.mask[:, :12]
    torch.testing.assert_close(packed[mask], padded[mask], rtol=1e-5, atol=1e-5)
    assert (packed[~mask] == 0).all()
    # a subset of rows (a micro-batch), in a non-sorted order, with a narrower width
    some = torch.tensor([8, 1, 5])
    with torch.no_grad():
        got = batch_logprobs(model, batch, some, mode)
        want = batch_logprobs(model, batch, some)
    assert got.shape == want.shape == (3, 9)
    real = batch.mask[some, :9]
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def gradient(model: torch.nn.Module, batch: TokenBatch, name: str, cut: MicroBatching, **kw):
    """Flat gradient of method `name`'s loss over the whole batch, through accumulate_gradients."""
    method, params = resolve(MethodParams(name=name, **kw))
    weights = torch.linspace(-1.0, 1.0, len(batch))
    rows = torch.arange(len(batch))
    old = frozen_logprobs(model, batch, cut)
    model.zero_grad(set_to_none=True)
    totals = accumulate_gradients(
        model, batch, method, params, weights, rows, rows, cut, old_logp=old
    )
    grad = flat_grad(model)
    model.zero_grad(set_to_none=True)
    return grad, totals


@pytest.mark.parametrize("sequences", ["bounded", "one"])
@pytest.mark.parametrize("mode", ["pack", "prefix"])
@pytest.mark.parametrize(
    ("name", "params"),
    [("grpo", {"beta": 0.0}), ("fisft+-", {}), ("grpo", {"aggregation": "token-mean"})],
)
def test_gradient_equals_the_padded_one(
    tiny_random_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    name: str,
    params: dict,
    sequences: str,
) -> None:
    """The real loss, micro-batched (3 rows per pass, so groups are split across passes)."""
    if sequences == "one":
        one_sequence(monkeypatch)
    model = load_model(tiny_random_model_dir)
    batch = ragged_batch(seed=1)
    want, _ = gradient(model, batch, name, MicroBatching(3), **params)
    got, totals = gradient(model, batch, name, MicroBatching(3, 0, mode), **params)
    assert want.abs().max() > 0
    assert float((got - want).norm() / want.norm()) < 1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if "ratio_sum" in totals:  # the old log-probs came through the same layout: ratio 1
        assert totals["clipped_tokens"] == 0.0
        assert totals["ratio_sum"] == pytest.approx(totals["tokens"], rel=1e-6)


@pytest.mark.parametrize("mode", ["none", "pack", "prefix"])
def test_old_logprobs_are_the_differentiated_ones_bit_for_bit(
    tiny_random_model_dir: Path, mode: str
) -> None:
    """`frozen_logprobs` (eval, no grad: the old and reference log-probs) runs the layout the loss
    differentiates, so the first minibatch's ratio is exactly 1 (the padded layout's differ in
    the last bits)."""
    model = load_model(tiny_random_model_dir)
    batch = ragged_batch()
    cut = MicroBatching(4, 0, mode)
    old = frozen_logprobs(model.eval(), batch, cut)
    model.train()
    for rows in micro_slices(batch, torch.arange(len(batch)), cut):
        logp = batch_logprobs(model, batch, rows, mode)
        assert logp.requires_grad
        real = batch.mask[rows, : logp.shape[1]]
        assert torch.equal(logp.detach()[real], old[rows, : logp.shape[1]][real])


def test_lora_policy_and_reference_score_the_same_packed(tiny_random_model_dir: Path) -> None:
    """A peft-adapted policy (adapters moved off zero) and its adapters-off reference."""
    from test_lora import lora_config, perturb_adapters

    from rlino.setup import build

    setup = build(lora_config(tiny_random_model_dir))
    perturb_adapters(setup)
    assert setup.reference is not None
    batch = ragged_batch()
    cut, mask = MicroBatching(4), batch.mask
    for model in (setup.policy.model, setup.reference.model):
        padded = frozen_logprobs(model, batch, cut)
        for mode in ("pack", "prefix"):
            packed = frozen_logprobs(model, batch, dataclasses.replace(cut, packing=mode))
            torch.testing.assert_close(packed[mask], padded[mask], rtol=1e-5, atol=1e-5)
    method, params = resolve(MethodParams(name="fisft+"))
    rows = torch.arange(len(batch))
    grads = []
    for mode in ("none", "prefix"):
        setup.policy.model.zero_grad(set_to_none=True)
        w = torch.ones(len(batch))
        c = dataclasses.replace(cut, packing=mode)
        accumulate_gradients(setup.policy.model, batch, method, params, w, rows, rows, c)
        grads.append(flat_grad(setup.policy.model))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(
        grads[1], grads[0], rtol=1e-5, atol=1e-5 * float(grads[0].abs().max())
    )


def test_sliding_window_model_packs_and_refuses_prefix() -> None:
    """A Qwen2 whose second layer sees 4 tokens back: pack keeps the window (transformers'
    packed-sequence masks), prefix's ready-made mask could not, so it is refused."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    model = Qwen2ForCausalLM(config).eval()
    assert set(config.layer_types) == {"full_attention", "sliding_attention"}
    batch = ragged_batch()
    rows = torch.arange(len(batch))
    with torch.no_grad():
        padded = batch_logprobs(model, batch, rows)
        packed = batch_logprobs(model, batch, rows, "pack")
    torch.testing.assert_close(packed[batch.mask[:, :12]], padded[batch.mask[:, :12]])
    with pytest.raises(UserError, match="prefix needs full attention"):
        batch_logprobs(model, batch, rows, "prefix")


def test_unsupported_models_are_refused() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig()
    config._attn_implementation = "flash_attention_2"
    check_model(SimpleNamespace(config=config), "pack")  # flash attention packs natively
    with pytest.raises(UserError, match="prefix needs sdpa or eager attention"):
        check_model(SimpleNamespace(config=config), "prefix")
    hybrid = LlamaConfig()
    hybrid.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UserError, match="linear_attention"):
        check_model(SimpleNamespace(config=hybrid), "pack")

    class RemoteConfig(LlamaConfig):  # as trust_remote_code would define it
        pass

    with pytest.raises(UserError, match="built into transformers"):
        check_model(SimpleNamespace(config=RemoteConfig()), "pack")


# ---- config and the training loop -------------------------------------------------------------


def test_config_takes_the_modes_and_rejects_others() -> None:
    for mode in ("none", "pack", "prefix"):
        assert load_config(None, {"optim": {"packing": mode}}).optim.packing == mode
    assert load_config(None, {}).optim.packing == "none"
    with pytest.raises(UserError, match=r"optim\.packing must be none, pack or prefix"):
        load_config(None, {"optim": {"packing": "padded"}})


def test_training_with_prefix_sharing(
    tiny_random_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 iterations of GRPO with several optimiser steps (old log-probs needed), all prefix."""
    modes: list[str] = []
    real = rlino.packing.packed_logprobs

    def spy(model: torch.nn.Module, batch: TokenBatch, rows: torch.Tensor, mode: str):
        modes.append(mode)
        return real(model, batch, rows, mode)

    monkeypatch.setattr("rlino.update.packed_logprobs", spy)
    cfg = tiny_config(
        tiny_random_model_dir, "grpo", optim={"packing": "prefix"}, iterations=2, eval={"every": 0}
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.completed and result.iterations_done == 2
    assert modes and set(modes) == {"prefix"}


# ---- FSDP2 and reduced precision --------------------------------------------------------------

FSDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from test_packing import load_model, ragged_batch
from rlino import fsdp
from rlino.distributed import World
from rlino.methods import MethodParams, resolve
from rlino.precision import Precision
from rlino.update import MicroBatching, accumulate_gradients, flat_grad, frozen_logprobs

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
world = World(0, 1, "fsdp")
plain, sharded = load_model(sys.argv[1]), load_model(sys.argv[1])
fsdp.shard(sharded, world, Precision(torch.float32, torch.float32))
assert world.sharded and fsdp.is_sharded(sharded)
batch = ragged_batch()
rows = torch.arange(len(batch))
method, params = resolve(MethodParams(name="fisft+-"))
weights = torch.linspace(-1.0, 1.0, len(batch))


def gradient(model, mode, world=None):
    model.zero_grad(set_to_none=True)
    cut = MicroBatching(4, 0, mode)
    accumulate_gradients(model, batch, method, params, weights, rows, rows, cut, world=world)
    return flat_grad(model)


want_logp = frozen_logprobs(plain, batch, MicroBatching(4))
want = gradient(plain, "none")
for mode in ("pack", "prefix"):
    with fsdp.gathered(sharded):
        logp = frozen_logprobs(sharded, batch, MicroBatching(4, 0, mode))
    torch.testing.assert_close(logp[batch.mask], want_logp[batch.mask], rtol=1e-5, atol=1e-5)
    got = gradient(sharded, mode, world)
    assert float((got - want).norm() / want.norm()) < 1e-5, mode
dist.destroy_process_group()
print("fsdp ok")
"""


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bf16_model_packs(tiny_random_model_dir: Path, attention: str) -> None:
    """In bf16 (the compute copy of mixed precision): sdpa's boolean mask and eager's fp32
    additive one meet bf16 scores; log-probs agree with the padded ones to bf16 accuracy."""
    model = load_model(tiny_random_model_dir, attention).to(torch.bfloat16)
    batch = ragged_batch()
    rows = torch.arange(len(batch))
    padded = batch_logprobs(model, batch, rows).detach()
    real = batch.mask[:, : padded.shape[1]]
    for mode in ("pack", "prefix"):
        logp = batch_logprobs(model, batch, rows, mode)
        (logp * real).sum().backward()
        assert logp.dtype == torch.float32
        torch.testing.assert_close(logp.detach()[real], padded[real], rtol=0, atol=2e-2)
    assert all(p.grad is not None for p in model.parameters())


def test_fsdp2_sharded_model_packs(tiny_random_model_dir: Path) -> None:
    """FSDP2 on one rank (gloo, in a fresh process): the sharded branch (the root's forward with
    one logit row, the decoder's output taken on the way) gives the padded log-probs and gradient."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", FSDP_SCRIPT, str(tiny_random_model_dir)],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "fsdp ok" in proc.stdout, proc.stderr[-3000:]
