"""Policy loading/saving and token log-probs, on real tiny models (and SmolLM2 GGUF when slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlino.errors import UserError
from rlino.policy import (
    Policy,
    load_policy,
    save_policy,
    token_logprobs,
    token_logprobs_and_entropy,
)


@pytest.fixture(scope="module")
def tiny(tiny_random_model_dir: Path) -> Policy:
    return load_policy(str(tiny_random_model_dir), device="cpu")


def batch(policy: Policy) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts of different lengths followed by right-padded completions."""
    tok = policy.tokenizer
    prompts = ["12+7=", "a", "(3*4)-5 is"]
    completions = ["19<eos>", "bcd", "7 yes"]
    pad = tok.pad_token_id
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    c_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    lp, lc = max(map(len, p_ids)), max(map(len, c_ids))
    ids, mask = [], []
    for p, c in zip(p_ids, c_ids, strict=True):
        ids.append([pad] * (lp - len(p)) + p + c + [pad] * (lc - len(c)))
        mask.append([0] * (lp - len(p)) + [1] * (len(p) + len(c)) + [0] * (lc - len(c)))
    return torch.tensor(ids), torch.tensor(mask, dtype=torch.bool), lp


def naive(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Full (B, L, V) log_softmax, with positions counted from the first real token."""
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
    logp = logits.float().log_softmax(-1)[:, start - 1 : -1]  # (B, Lc, V)
    return logp.gather(2, ids[:, start:, None]).squeeze(2)


def test_load_local_dir(tiny: Policy, tiny_random_model_dir: Path) -> None:
    assert tiny.device == torch.device("cpu")
    assert tiny.dtype == torch.float32
    assert tiny.tokenizer.padding_side == "left"
    assert tiny.tokenizer.pad_token_id is not None
    assert tiny.source == str(tiny_random_model_dir)
    assert next(tiny.model.parameters()).dtype == torch.float32


def test_load_dtype_option(tiny_random_model_dir: Path) -> None:
    policy = load_policy(str(tiny_random_model_dir), device="cpu", dtype="bf16")
    assert policy.dtype == torch.bfloat16
    assert next(policy.model.parameters()).dtype == torch.bfloat16


def test_missing_path_and_bad_options(tmp_path: Path, tiny_random_model_dir: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_policy(str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match=r"no config\.json"):
        load_policy(str(tmp_path))
    with pytest.raises(UserError, match="dtype"):
        load_policy(str(tiny_random_model_dir), dtype="int3")
    with pytest.raises(UserError, match=r"not found in"):
        load_policy(str(tiny_random_model_dir), gguf_file="missing.gguf")


def test_token_logprobs_equals_naive(tiny: Policy) -> None:
    ids, mask, start = batch(tiny)
    with torch.no_grad():
        ours = token_logprobs(tiny.model, ids, mask, start)
        ref = naive(tiny.model, ids, mask, start)
    assert ours.shape == (3, ids.shape[1] - start)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_chunking_changes_nothing(tiny: Policy) -> None:
    ids, mask, start = batch(tiny)
    with torch.no_grad():
        whole = token_logprobs_and_entropy(tiny.model, ids, mask, start, chunk_size=10_000)
        tiny_chunks = token_logprobs_and_entropy(tiny.model, ids, mask, start, chunk_size=4)
    for a, b in zip(whole, tiny_chunks, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_entropy_matches_naive(tiny: Policy) -> None:
    ids, mask, start = batch(tiny)
    with torch.no_grad():
        _, entropy = token_logprobs_and_entropy(tiny.model, ids, mask, start)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = tiny.model(
            input_ids=ids, attention_mask=mask.long(), position_ids=positions
        ).logits
        logp = logits[:, start - 1 : -1].log_softmax(-1)
        ref = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(entropy, ref, atol=1e-5)


def test_gradient_flows_and_matches_naive(tiny: Policy) -> None:
    ids, mask, start = batch(tiny)
    weights = mask[:, start:].float()
    params = [p for p in tiny.model.parameters() if p.requires_grad]

    tiny.model.zero_grad()
    (token_logprobs(tiny.model, ids, mask, start, chunk_size=5) * weights).sum().backward()
    ours = [p.grad.clone() for p in params]
    tiny.model.zero_grad()
    (naive(tiny.model, ids, mask, start) * weights).sum().backward()
    ref = [p.grad.clone() for p in params]
    tiny.model.zero_grad()
    assert any(g.abs().sum() > 0 for g in ours)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_temperature_scales_logits(tiny: Policy) -> None:
    ids, mask, start = batch(tiny)
    with torch.no_grad():
        hot = token_logprobs(tiny.model, ids, mask, start, temperature=2.0)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = tiny.model(
            input_ids=ids, attention_mask=mask.long(), position_ids=positions
        ).logits
        ref = (logits[:, start - 1 : -1] / 2.0).log_softmax(-1).gather(2, ids[:, start:, None])
    assert torch.allclose(hot, ref.squeeze(2), atol=1e-5)


def test_save_local_roundtrip(tiny: Policy, tmp_path: Path) -> None:
    save_policy(tiny, tmp_path / "copy")
    again = load_policy(str(tmp_path / "copy"), device="cpu")
    ids, mask, start = batch(tiny)
    with torch.no_grad():
        assert torch.equal(
            token_logprobs(tiny.model, ids, mask, start),
            token_logprobs(again.model, ids, mask, start),
        )


@pytest.mark.slow
def test_gguf_load_and_save(smollm2_gguf: tuple[Path, str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = smollm2_gguf
    policy = load_policy(str(directory / name), device="cpu")
    assert policy.source == str(directory / name)
    assert policy.tokenizer.padding_side == "left"
    save_policy(policy, tmp_path / "plain")
    assert (tmp_path / "plain" / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "plain")
    ids = policy.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert (
        tok("The capital of France is", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    )
    with torch.no_grad():
        assert torch.equal(policy.model(ids).logits, plain(ids).logits)
