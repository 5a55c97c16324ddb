"""The rollout engines on real tiny models: exactness vs HF greedy, seeds, stops, shapes, statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlino.errors import UserError
from rlino.policy import Policy, load_policy, token_logprobs
from rlino.rollout import Rollouts, SamplingConfig, cut_after_stop, eos_ids, generate

PROMPTS = ["12+7=", "(3*4)-5 is", "a", "what is 9*9? answer:"]


@pytest.fixture(scope="module")
def tiny(tiny_random_model_dir: Path) -> Policy:
    return load_policy(str(tiny_random_model_dir), device="cpu")


def encode(policy: Policy, texts: list[str]) -> list[list[int]]:
    return [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_greedy(policy: Policy, prompt_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """Reference: HF generate, greedy, left-padded batch, completion up to and including the
    first EOS id (tokenizer's or generation config's; HF pads after it). Also used on CUDA by
    tests/test_gpu_check.py."""
    tok = policy.tokenizer
    batch = tok.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left")
    batch = {k: v.to(policy.device) for k, v in batch.items()}
    with torch.no_grad():
        out = policy.model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=tok.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    ends = set(eos_ids(policy))
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        rows.append(row[:cut])
    return rows


def completions(r: Rollouts) -> list[list[int]]:
    return [ids[m].tolist() for ids, m in zip(r.completion_ids, r.completion_mask, strict=True)]


def test_greedy_matches_hf_generate(tiny: Policy) -> None:
    prompts = encode(tiny, PROMPTS)
    r = generate(tiny, prompts, 1, SamplingConfig(temperature=0, max_new_tokens=24), seed=0)
    assert completions(r) == hf_greedy(tiny, prompts, 24)


def test_greedy_matches_with_samples_chunks_and_compaction(
    tiny: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several samples per prompt, small chunks and rows dropped mid-way: still HF's greedy tokens."""
    from rlino.rollout.sampler import SlabCache

    kept_rows: list[int] = []
    original = SlabCache.batch_select_indices

    def spy(self: SlabCache, indices: torch.Tensor) -> None:
        kept_rows.append(indices.numel())
        original(self, indices)

    monkeypatch.setattr(SlabCache, "batch_select_indices", spy)
    prompts = encode(tiny, PROMPTS)
    reference = hf_greedy(tiny, prompts, 24)
    stop = (reference[0][3], reference[2][2])  # tokens the greedy path really emits early
    config = SamplingConfig(temperature=0, max_new_tokens=24, stop_token_ids=stop)
    r = generate(tiny, prompts, 3, config, seed=0, batch_size=6)
    expected = []
    for row in reference:
        ends = (*stop, tiny.tokenizer.eos_token_id)
        cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        expected += [row[:cut]] * 3
    assert completions(r) == expected
    assert kept_rows, "finished rows were never dropped from the batch"


def test_hf_backend_greedy_agrees(tiny: Policy) -> None:
    prompts = encode(tiny, PROMPTS)
    config = SamplingConfig(temperature=0, max_new_tokens=16)
    ours = generate(tiny, prompts, 2, config, seed=0)
    theirs = generate(tiny, prompts, 2, config, seed=0, backend="hf")
    assert completions(ours) == completions(theirs)
    assert torch.equal(ours.finished, theirs.finished)
    assert theirs.logprobs is None


def test_shapes_prompt_index_and_shared_prompts(tiny: Policy) -> None:
    prompts = encode(tiny, PROMPTS)
    r = generate(tiny, prompts, 3, SamplingConfig(max_new_tokens=10), seed=1)
    n, width = 4 * 3, max(len(p) for p in prompts)
    assert r.prompt_ids.shape == r.prompt_mask.shape == (n, width)
    assert r.completion_ids.shape == r.completion_mask.shape == r.logprobs.shape
    assert r.completion_ids.shape[0] == n and r.completion_ids.shape[1] <= 10
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for row, mask, i in zip(r.prompt_ids, r.prompt_mask, r.prompt_index, strict=True):
        assert row[mask].tolist() == prompts[i]
        assert mask.tolist() == sorted(mask.tolist())  # left padding
    assert (r.completion_ids[~r.completion_mask] == tiny.tokenizer.pad_token_id).all()
    assert (r.logprobs[~r.completion_mask] == 0).all()
    assert (r.logprobs[r.completion_mask] <= 0).all()
    # the mask is a prefix; finished rows end with EOS, the others ran to max_new_tokens
    lengths = r.completion_mask.sum(1)
    assert (r.completion_mask.int().diff(dim=1) <= 0).all()
    for row, length, done in zip(r.completion_ids, lengths, r.finished, strict=True):
        if done:
            assert row[length - 1] == tiny.tokenizer.eos_token_id
        else:
            assert length == 10
    assert len(r.texts(tiny.tokenizer)) == n


def test_a_prompts_samples_do_not_depend_on_its_batch(tiny: Policy) -> None:
    """One stream per prompt: alone, in a batch, or in chunks, a prompt draws the same samples.

    What makes N data-parallel ranks sample like one process (each holds a shard of the prompts).
    """
    from rlino.rollout import prompt_seeds

    prompts = encode(tiny, PROMPTS)
    config = SamplingConfig(max_new_tokens=20)
    seeds = prompt_seeds(11, range(2, 2 + len(prompts)))  # e.g. the shard starting at prompt 2
    whole = completions(generate(tiny, prompts, 3, config, seed=seeds))
    chunked = completions(generate(tiny, prompts, 3, config, seed=seeds, batch_size=3))
    alone = [
        row
        for prompt, seed in zip(prompts, seeds, strict=True)
        for row in completions(generate(tiny, [prompt], 3, config, seed=[seed]))
    ]
    assert whole == chunked == alone
    assert len({tuple(row) for row in whole}) > len(prompts)  # real sampling, not one path


def test_seed_determinism(tiny: Policy) -> None:
    prompts = encode(tiny, PROMPTS)
    config = SamplingConfig(max_new_tokens=20, top_k=20, top_p=0.9)
    a = generate(tiny, prompts, 4, config, seed=3)
    b = generate(tiny, prompts, 4, config, seed=3)
    c = generate(tiny, prompts, 4, config, seed=4)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # samples of one prompt differ from each other
    assert len({tuple(row) for row in completions(a)[:4]}) > 1


def test_max_new_tokens(tiny: Policy) -> None:
    config = SamplingConfig(max_new_tokens=7, ignore_eos=True)
    r = generate(tiny, encode(tiny, PROMPTS), 2, config, seed=0)
    assert r.completion_ids.shape[1] == 7
    assert r.completion_mask.all() and not r.finished.any()


def test_stop_strings(tiny: Policy) -> None:
    """Stop strings end samples; no text after them is kept and the mask ends at the stop token."""
    prompts = encode(tiny, PROMPTS)
    stops = ("e", "12")
    r = generate(tiny, prompts, 8, SamplingConfig(max_new_tokens=40, stop_strings=stops), seed=5)
    tok = tiny.tokenizer
    hits = 0
    for ids, mask, done, text in zip(
        r.completion_ids, r.completion_mask, r.finished, r.texts(tok), strict=True
    ):
        kept = ids[mask].tolist()
        decoded = tok.decode(kept, skip_special_tokens=True)
        if done and kept[-1] != tok.eos_token_id:
            hits += 1
            assert text.endswith(stops)
            before = tok.decode(kept[:-1], skip_special_tokens=True)
            assert not any(s in before for s in stops)  # the last token completes it
        else:
            assert not any(s in decoded for s in stops)
    assert hits > 0


def test_cut_after_stop() -> None:
    assert cut_after_stop("ab</answer>xyz", ("</answer>",)) == "ab</answer>"
    assert cut_after_stop("abc", ("x",)) == "abc"
    assert cut_after_stop("a1b2", ("2", "1")) == "a1"


def test_sampling_frequencies_match_softmax(tiny: Policy) -> None:
    """One step, many samples: empirical token frequencies follow softmax(logits / T)."""
    prompt = encode(tiny, ["7*8="])
    config = SamplingConfig(temperature=0.7, max_new_tokens=1)
    r = generate(tiny, prompt, 6000, config, seed=0)
    with torch.no_grad():
        logits = tiny.model(torch.tensor(prompt)).logits[0, -1]
    probs = (logits / 0.7).softmax(-1)
    freq = torch.bincount(r.completion_ids[:, 0], minlength=probs.numel()).double() / 6000
    assert (freq - probs.double()).abs().max() < 0.02
    # the reported log-probs are those of the tempered distribution
    chosen = r.completion_ids[:, 0]
    assert torch.allclose(r.logprobs[:, 0], probs.log()[chosen], atol=1e-5)


def test_top_k_one_is_greedy(tiny: Policy) -> None:
    prompts = encode(tiny, PROMPTS)
    greedy = generate(tiny, prompts, 1, SamplingConfig(temperature=0, max_new_tokens=12), seed=0)
    topk = generate(tiny, prompts, 2, SamplingConfig(top_k=1, max_new_tokens=12), seed=9)
    assert completions(topk)[::2] == completions(greedy)


def test_sampler_logprobs_match_token_logprobs(tiny: Policy) -> None:
    prompts = encode(tiny, PROMPTS)
    r = generate(tiny, prompts, 2, SamplingConfig(max_new_tokens=15), seed=2)
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    with torch.no_grad():
        lp = token_logprobs(tiny.model, ids, mask, r.prompt_ids.shape[1])
    assert torch.allclose(lp[r.completion_mask], r.logprobs[r.completion_mask], atol=1e-4)


def test_bad_inputs(tiny: Policy) -> None:
    with pytest.raises(UserError):
        generate(tiny, [[1, 2]], 1, SamplingConfig(), seed=0, backend="nope")
    with pytest.raises(UserError):
        generate(tiny, [[]], 1, SamplingConfig(), seed=0)
    with pytest.raises(UserError):
        SamplingConfig(top_p=0)
    with pytest.raises(UserError):
        generate(tiny, [[1, 2]], 0, SamplingConfig(), seed=0)


def test_vllm_backend_needs_vllm_and_gpu(tiny: Policy) -> None:
    pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the refusal path only")
    with pytest.raises(UserError):
        generate(tiny, [[3, 4]], 1, SamplingConfig(), seed=0, backend="vllm")


@pytest.mark.slow
def test_greedy_matches_hf_on_smollm2(smollm2_gguf: tuple[Path, str]) -> None:
    directory, name = smollm2_gguf
    policy = load_policy(str(directory), gguf_file=name, device="cpu")
    texts = ["The capital of France is", "2 + 2 =", "Write a haiku about the sea:\n"]
    prompts = encode(policy, texts)
    r = generate(policy, prompts, 1, SamplingConfig(temperature=0, max_new_tokens=32), seed=0)
    assert completions(r) == hf_greedy(policy, prompts, 32)


# ---- the lean decode step (rlino.rollout.fast_decode) and the two-level draw ----


def random_policy(kind: str, tokenizer: object) -> Policy:
    """A random 2-layer Llama / Mistral with GQA and an untied head, on the fixture's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if kind == "llama3-rope":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    elif kind == "mistral":  # head_dim 16 != hidden / heads, one shared key/value head
        common.update(num_key_value_heads=1, head_dim=16)
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        rope = {"rope_type": kind, "rope_theta": 10000.0}
        if kind == "dynamic":
            rope["factor"] = 2.0
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    return Policy(model.eval(), tokenizer, torch.device("cpu"), torch.float32, f"random {kind}")


def test_lean_step_is_bitwise_the_model_forward(tiny: Policy) -> None:
    """Lean decode vs the model's own forward: same tokens and log-probs, to the last bit."""
    from rlino.rollout.fast_decode import lean_decoder
    from rlino.rollout.sampler import generate_builtin

    assert lean_decoder(tiny.model, 64) is not None  # the tiny Llama really takes the lean path
    prompts = encode(tiny, PROMPTS)
    seeds = list(range(7, 7 + len(prompts)))
    configs = [
        SamplingConfig(temperature=0, max_new_tokens=24, stop_token_ids=(5, 9)),
        SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=24),
    ]
    for config in configs:
        lean = generate_builtin(tiny, prompts, 3, config, seeds=seeds, batch_size=6)
        slow = generate_builtin(tiny, prompts, 3, config, seeds=seeds, batch_size=6, lean=False)
        assert torch.equal(lean.completion_ids, slow.completion_ids)
        assert torch.equal(lean.completion_mask, slow.completion_mask)
        assert torch.equal(lean.logprobs, slow.logprobs)
        assert torch.equal(lean.finished, slow.finished)


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="needs a CPU with bf16 oneDNN kernels"
)
def test_bf16_prepacked_weights_change_nothing(
    tiny: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on CPU: weights prepacked for oneDNN give the tokens and log-probs of plain matmuls."""
    import copy

    from rlino.rollout import fast_decode
    from rlino.rollout.sampler import generate_builtin

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    policy = Policy(model, tiny.tokenizer, torch.device("cpu"), torch.bfloat16, "tiny bf16")
    decoder = fast_decode.lean_decoder(model, 64, rows=6)
    assert decoder is not None and decoder.layers[0].qkv.packed is not None
    prompts = encode(policy, PROMPTS)
    config = SamplingConfig(temperature=1.0, max_new_tokens=24)
    packed = generate_builtin(policy, prompts, 3, config, seeds=[3] * len(prompts))
    monkeypatch.setattr(fast_decode, "onednn_bf16", lambda weight: False)
    plain = generate_builtin(policy, prompts, 3, config, seeds=[3] * len(prompts))
    assert torch.equal(packed.completion_ids, plain.completion_ids)
    assert torch.equal(packed.logprobs, plain.logprobs)


@pytest.mark.parametrize("kind", ["default", "llama3-rope", "mistral"])
def test_lean_greedy_matches_hf_on_llama_family(tiny: Policy, kind: str) -> None:
    """Untied heads, GQA, an explicit head_dim and Llama-3 RoPE scaling: still HF's greedy tokens."""
    from rlino.rollout.fast_decode import lean_decoder

    policy = random_policy(kind, tiny.tokenizer)
    assert lean_decoder(policy.model, 64) is not None
    prompts = encode(policy, PROMPTS)
    r = generate(policy, prompts, 1, SamplingConfig(temperature=0, max_new_tokens=24), seed=0)
    assert completions(r) == hf_greedy(policy, prompts, 24)


def test_lean_decoder_refuses_what_it_cannot_reproduce(tiny: Policy) -> None:
    """Dynamic RoPE and sliding windows in reach fall back to the model's forward, which still works."""
    from rlino.rollout.fast_decode import lean_decoder, unsupported_reason

    dynamic = random_policy("dynamic", tiny.tokenizer)
    assert "rope type" in (unsupported_reason(dynamic.model, 64) or "")
    assert lean_decoder(dynamic.model, 64) is None
    prompts = encode(dynamic, PROMPTS)
    r = generate(dynamic, prompts, 1, SamplingConfig(temperature=0, max_new_tokens=12), seed=0)
    assert completions(r) == hf_greedy(dynamic, prompts, 12)
    mistral = random_policy("mistral", tiny.tokenizer)
    window = mistral.model.config.sliding_window
    assert unsupported_reason(mistral.model, window) is None
    assert "sliding window" in (unsupported_reason(mistral.model, window + 1) or "")


def test_draw_follows_weights_and_never_picks_zeros() -> None:
    """Two-level inverse CDF over several blocks (and a padded last one): right frequencies."""
    from rlino.rollout.draw import DRAW_BLOCK, draw

    vocab, rows = 2 * DRAW_BLOCK + 37, 40_000
    weights = torch.rand(vocab, generator=torch.Generator().manual_seed(0)) ** 4
    weights[::3] = 0.0  # e.g. masked by top-k / top-p
    weights[-1] = 0.5  # a heavy token in the padded block
    uniform = torch.rand((rows, 2), generator=torch.Generator().manual_seed(1))
    tokens = draw(weights.expand(rows, -1), uniform)
    again = draw(weights.expand(rows, -1), uniform.clone())
    assert torch.equal(tokens, again)
    assert (weights[tokens] > 0).all()
    freq = torch.bincount(tokens, minlength=vocab).double() / rows
    assert (freq - weights.double() / weights.sum()).abs().max() < 0.01


@pytest.mark.parametrize("chunk_blocks", [2, 8])  # several chunks / the whole vocabulary in one
def test_streaming_softmax_draw_matches_the_softmax(
    monkeypatch: pytest.MonkeyPatch, chunk_blocks: int
) -> None:
    """Chunked draw (ragged last block): softmax frequencies, exact log-probs, `draw`'s tokens."""
    from rlino.rollout import draw as sampler

    monkeypatch.setattr(sampler, "SAMPLE_CHUNK", chunk_blocks * sampler.DRAW_BLOCK)
    vocab, rows, temperature = 5 * sampler.DRAW_BLOCK + 37, 40_000, 0.7
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=gen) * 3
    logits[-1] = logits.max() + 1.0  # the likeliest token sits in the ragged last block
    logits[7] = float("-inf")  # a banned token is never drawn
    batch = logits.expand(rows, -1)
    uniform = torch.rand((rows, 2), generator=torch.Generator().manual_seed(1))
    tokens, logprobs = sampler.sample_softmax(batch, temperature, uniform)
    again, _ = sampler.sample_softmax(batch, temperature, uniform.clone())
    assert torch.equal(tokens, again)
    expected = torch.softmax(logits.double() / temperature, dim=0)
    assert not (tokens == 7).any()
    freq = torch.bincount(tokens, minlength=vocab).double() / rows
    assert (freq - expected).abs().max() < 0.01
    assert torch.allclose(logprobs.double(), expected.log()[tokens], atol=1e-5, rtol=0)
    # Same uniforms, same blocks: the tokens of the plain softmax-then-draw path.
    plain = sampler.draw(torch.softmax(batch / temperature, dim=1), uniform)
    assert (plain == tokens).double().mean() > 0.999


def test_lm_head_in_blocks_matches_one_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocked lm_head (ragged last block) gives the logits of a single matmul."""
    from rlino.rollout import fast_decode

    monkeypatch.setattr(fast_decode, "LOGITS_CHUNK", 16)
    gen = torch.Generator().manual_seed(0)
    x, head = torch.randn(5, 24, generator=gen), torch.randn(90, 24, generator=gen)
    logits = fast_decode.lm_head_logits(x, head)
    assert logits.shape == (5, 90)
    assert torch.allclose(logits, x @ head.t(), atol=1e-5, rtol=0)
