"""LoRA runs (`model.lora`, rlino.lora) on the tiny random model: what trains, the reference,
sampling, checkpoints and resume, the merged final model, bad settings.

A toy task ("lora-contains-a": right when the completion holds an "a") gives the random character
model a mix of right and wrong samples, so GRPO has a gradient; beta > 0 brings in the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config
from toy_tasks import letter_task

import rlino.train
from rlino.errors import UserError
from rlino.lora import ADAPTER_DIR, ADAPTER_FILE, AdaptersOff, LoraPolicy
from rlino.policy import load_policy, token_logprobs
from rlino.rollout import SamplingConfig, generate
from rlino.rollout.fast_decode import lean_decoder
from rlino.setup import Setup, build, make_optimizer
from rlino.train import train
from rlino.update import MicroBatching, TokenBatch, frozen_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

letter_task("lora-contains-a", "a", train=64, test=8, question="item")

LORA = {"r": 4, "alpha": 8}


def lora_config(model_dir: Path, **extra: Any) -> Any:
    """A 4-iteration GRPO run with a KL term and rank-4 adapters on every linear layer."""
    overrides: dict[str, Any] = {
        "model": {"lora": dict(LORA)},
        "task": {"name": "lora-contains-a"},
        "method": {"beta": 0.04},
        "checkpoint_every": 0,
    }
    for key, value in extra.items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_config(model_dir, "grpo", **overrides)  # test_train's run, with these changes


def train_keeping_setup(
    config: Any, run_dir: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> tuple[Any, Setup]:
    """`train`, also returning the Setup it built (to look at the live model afterwards)."""
    built: list[Setup] = []

    def keep(*args: Any, **kw: Any) -> Setup:
        built.append(build(*args, **kw))
        return built[-1]

    monkeypatch.setattr(rlino.train, "build", keep)
    result = train(config, run_dir, progress=False, **kwargs)
    return result, built[-1]


def base_key(name: str) -> str:
    """The plain model's name of a parameter of the adapted model (`q_proj.base_layer.weight`)."""
    return name.replace(".base_layer.", ".")


def batch_of(setup: Setup, seed: int = 0) -> TokenBatch:
    """A rollout batch of 4 prompts x 2 samples from the setup's policy."""
    tok = setup.policy.tokenizer
    prompts = [tok(f"item {i} =")["input_ids"] for i in range(4)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    rollouts = generate(setup.policy, prompts, 2, sampling, seed=seed)
    return TokenBatch.from_rollouts(rollouts, setup.policy.device)


def perturb_adapters(setup: Setup, scale: float = 0.5) -> None:
    """Give every adapter a non-zero B (peft starts B at 0, so fresh adapters change nothing)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in setup.policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def optimised_params(setup: Setup) -> list[torch.nn.Parameter]:
    """The parameters the run's optimiser steps."""
    return [p for group in make_optimizer(setup).param_groups for p in group["params"]]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_only_the_adapters_train(
    tiny_random_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """The base weights stay byte-identical to the files on disk (bf16: their rounding, the
    compute dtype they are held in), the fp32 adapters move, and nothing else is trained."""
    cfg = lora_config(tiny_random_model_dir, iterations=3, model={"dtype": dtype})
    result, setup = train_keeping_setup(cfg, tmp_path / "run", monkeypatch)
    assert result.completed
    assert isinstance(setup.policy, LoraPolicy)
    assert setup.compute_copy is None  # no second copy under mixed precision either
    on_disk = load_file(str(tiny_random_model_dir / "model.safetensors"))
    base_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    trained, frozen = [], []
    for name, p in setup.policy.model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.dtype == torch.float32
            trained.append(name)
            if "lora_B" in name:  # starts at 0
                assert p.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.dtype == base_dtype
            assert torch.equal(p, on_disk[base_key(name)].to(base_dtype)), name
            frozen.append(name)
    assert trained and frozen
    # 7 linear layers per decoder layer, 2 layers, an A and a B each
    assert len(trained) == 7 * 2 * 2
    optimised = {id(p) for p in optimised_params(setup)}
    assert optimised == {id(p) for p in setup.policy.model.parameters() if p.requires_grad}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(row["optim/kl"] >= 0 for row in rows[1:])
    assert any(row["optim/kl"] > 0 for row in rows[1:])  # the reference differs from the policy


def test_reference_is_the_base_model_without_a_copy(tiny_random_model_dir: Path) -> None:
    """The reference's log-probs are those of the plain base model, bit for bit, while the
    policy's differ; the reference holds no weights of its own and leaves the adapters trainable."""
    setup = build(lora_config(tiny_random_model_dir))
    perturb_adapters(setup)
    reference = setup.reference
    assert reference is not None and isinstance(reference.model, AdaptersOff)
    assert reference.model.hf_model is setup.policy.model
    assert not list(reference.model.parameters())
    batch = batch_of(setup)
    cut = MicroBatching(max_rows=3)
    ref = frozen_logprobs(reference.model, batch, cut)
    plain = load_policy(str(tiny_random_model_dir), device="cpu", dtype="fp32")
    assert torch.equal(ref, frozen_logprobs(plain.model, batch, cut))
    policy = frozen_logprobs(setup.policy.model, batch, cut)
    assert (policy - ref)[batch.mask].abs().max() > 1e-3  # the adapters do something
    trainable = [p for n, p in setup.policy.model.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in trainable)
    # the whole causal LM through the wrapper is the base too
    with torch.no_grad():
        logits = reference.model(input_ids=batch.ids, attention_mask=batch.attn).logits
        assert torch.equal(
            logits, plain.model(input_ids=batch.ids, attention_mask=batch.attn).logits
        )


def test_sampling_uses_the_adapters(tiny_random_model_dir: Path) -> None:
    """The built-in sampler's log-probs are the adapted model's (the lean decode step, which would
    read the base weights only, declines an adapted model)."""
    setup = build(lora_config(tiny_random_model_dir))
    perturb_adapters(setup)
    assert lean_decoder(setup.policy.model, 64) is None
    tok = setup.policy.tokenizer
    prompts = [tok(f"item {i} =")["input_ids"] for i in range(3)]
    rollouts = generate(setup.policy, prompts, 2, SamplingConfig(max_new_tokens=10), seed=3)
    batch = TokenBatch.from_rollouts(rollouts, setup.policy.device)
    with torch.no_grad():
        adapted = token_logprobs(setup.policy.model, batch.ids, batch.attn, batch.start)
        base = token_logprobs(setup.reference.model, batch.ids, batch.attn, batch.start)
    mask = batch.mask
    assert torch.allclose(rollouts.logprobs[mask], adapted[mask], atol=1e-5)
    assert not torch.allclose(rollouts.logprobs[mask], base[mask], atol=1e-3)


def test_final_is_merged_and_loads_without_peft(
    tiny_random_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`final/` is a plain HF directory (no adapter config at its top) whose logits are the adapted
    model's; `final/adapter/` is the adapter alone, which peft applies to the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    _, setup = train_keeping_setup(
        lora_config(tiny_random_model_dir, iterations=2), run, monkeypatch
    )
    final = run / "final"
    assert (final / "model.safetensors").is_file()
    assert not (final / "adapter_config.json").exists()
    assert (final / ADAPTER_DIR / ADAPTER_FILE).is_file()
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name in merged.state_dict())
    ids = torch.tensor([[5, 9, 14, 20, 33, 40, 41]])
    with torch.no_grad():
        want = setup.policy.model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        assert (want - setup.reference.model(input_ids=ids).logits).abs().max() > 1e-4
        base = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir)
        applied = PeftModel.from_pretrained(base, final / ADAPTER_DIR)
        assert torch.equal(applied(input_ids=ids).logits, want)
    assert load_policy(str(final), device="cpu").model.__class__ is merged.__class__


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_restores_the_adapters_exactly(
    tiny_random_model_dir: Path, tmp_path: Path, dtype: str
) -> None:
    """2 + 2 iterations with a resume in between give the weights and metrics of 4 straight; a
    checkpoint holds the adapter alone."""
    cfg = lora_config(tiny_random_model_dir, model={"dtype": dtype})
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, straight, progress=False)
    first = train(cfg, split, progress=False, stop_after=2)
    assert not first.completed and first.iterations_done == 2
    saved = sorted(p.name for p in (split / "checkpoints" / "iter_000002" / "model").iterdir())
    assert ADAPTER_FILE in saved and "model.safetensors" not in saved
    second = train(cfg, split, resume=True, progress=False)
    assert second.completed and second.iterations_done == 4
    for name in ("model.safetensors", f"{ADAPTER_DIR}/{ADAPTER_FILE}"):
        a, b = load_file(str(straight / "final" / name)), load_file(str(split / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _comparable(straight / "metrics.jsonl") == _comparable(split / "metrics.jsonl")


def _comparable(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows without timings and memory (which differ between runs)."""
    rows = [json.loads(line) for line in path.open()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


@pytest.mark.parametrize(
    ("lora", "needle"),
    [
        ({"r": 0}, r"model\.lora\.r must be >= 1"),
        ({"alpha": -1}, r"model\.lora\.alpha must be > 0"),
        ({"dropout": 1.5}, r"model\.lora\.dropout must be in \[0, 1\)"),
        ({"target_modules": []}, r"model\.lora\.target_modules must be"),
        ({"target_modules": [1, 2]}, r"model\.lora\.target_modules must be"),
        ({"rank": 4}, r"unknown config key 'model\.lora\.rank'"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(
    tiny_random_model_dir: Path, lora: dict[str, Any], needle: str
) -> None:
    with pytest.raises(UserError, match=needle) as err:
        lora_config(tiny_random_model_dir, model={"lora": lora})
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("targets", "needle"),
    [
        (["nosuch_proj"], "not found in the base model"),
        (["lm_head"], "output head are not supported"),
        (["model.norm"], r"model\.lora: .*not supported"),  # an RMSNorm: not a layer peft adapts
    ],
)
def test_target_modules_the_model_lacks_are_one_line_errors(
    tiny_random_model_dir: Path, targets: list[str], needle: str
) -> None:
    cfg = lora_config(tiny_random_model_dir, model={"lora": {**LORA, "target_modules": targets}})
    with pytest.raises(UserError, match=needle) as err:
        build(cfg)
    assert len(str(err.value).splitlines()) == 1


def test_lora_with_vllm_is_refused(tiny_random_model_dir: Path) -> None:
    with pytest.raises(UserError, match=r"rollout\.backend vllm"):
        lora_config(tiny_random_model_dir, rollout={"backend": "vllm"})


def test_resume_with_other_lora_settings_is_a_user_error(
    tiny_random_model_dir: Path, tmp_path: Path
) -> None:
    """A checkpoint's adapter that does not fit the config (other r), or a checkpoint of a run
    without LoRA, stops with one line instead of loading something else."""
    cfg = lora_config(tiny_random_model_dir, iterations=1)
    train(cfg, tmp_path / "run", progress=False)
    model_dir = tmp_path / "run" / "checkpoints" / "iter_000001" / "model"
    other = lora_config(tiny_random_model_dir, model={"lora": {"r": 8}})
    with pytest.raises(UserError, match=r"does not fit model\.lora"):
        build(other, weights=model_dir)
    full = tmp_path / "full"
    load_policy(str(tiny_random_model_dir), device="cpu").tokenizer.save_pretrained(full)
    with pytest.raises(UserError, match="holds no LoRA adapter"):
        build(cfg, weights=full)
