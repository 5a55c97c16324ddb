"""One prompt encoding for training and evaluation (`rlino.tasks.encode_prompts`).

A tokenizer that adds BOS (like Llama's) is built here: a non-chat prompt must start with BOS, a
chat prompt (whose template text already holds BOS) must not get a second one, and `evaluate()`
must feed the model exactly the ids `encode_prompts` gives, the ids training samples from.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import rlino.rollout
from rlino.evaluate import evaluate
from rlino.policy import Policy
from rlino.tasks import encode_prompts
from rlino.tasks.gsm8k import GSM8KTask

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
EXAMPLES = [
    {"question": "What is 2 + 3?", "gold": "5"},
    {"question": "Tom has 4 apples and eats 1. How many are left?", "gold": "3"},
    {"question": "Is 12 / 4 = 3?", "gold": "3"},
]


@pytest.fixture(scope="module")
def bos_policy(one_thread: None) -> Policy:
    """A tiny random Llama whose character-level tokenizer prepends `<s>` (BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(
        set("0123456789+-*/=()<>[] ,.:\n?#$'\"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    )
    specials = ["<pad>", "<s>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["<eos>"],
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    return Policy(model, tokenizer, torch.device("cpu"), torch.float32, source="test")


def test_the_tokenizer_adds_bos(bos_policy: Policy) -> None:
    tokenizer = bos_policy.tokenizer
    bos = tokenizer.bos_token_id
    assert tokenizer("ab")["input_ids"][0] == bos
    assert tokenizer("ab", add_special_tokens=False)["input_ids"][0] != bos
    assert tokenizer("<s>ab", add_special_tokens=False)["input_ids"][0] == bos  # one token


@pytest.mark.parametrize("template", ["r1", "plain"])
def test_non_chat_prompts_start_with_bos(bos_policy: Policy, template: str) -> None:
    bos = bos_policy.tokenizer.bos_token_id
    for ids in encode_prompts(bos_policy.tokenizer, GSM8KTask(), EXAMPLES, template):
        assert ids[0] == bos and ids.count(bos) == 1


def test_chat_prompts_get_no_second_bos(bos_policy: Policy) -> None:
    bos = bos_policy.tokenizer.bos_token_id
    for ids in encode_prompts(bos_policy.tokenizer, GSM8KTask(), EXAMPLES, "chat"):
        assert ids[0] == bos and ids.count(bos) == 1


def test_default_template_is_the_tasks(bos_policy: Policy) -> None:
    task = GSM8KTask()
    assert encode_prompts(bos_policy.tokenizer, task, EXAMPLES) == encode_prompts(
        bos_policy.tokenizer, task, EXAMPLES, task.default_template
    )


@pytest.mark.parametrize("template", ["r1", "plain", "chat", None])
def test_evaluate_feeds_the_ids_training_encodes(
    bos_policy: Policy, template: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ids `evaluate()` hands the sampler are exactly `encode_prompts`'s, batch by batch."""
    seen: list[list[int]] = []
    original = rlino.rollout.generate

    def recording(policy: Policy, prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        seen.extend(list(p) for p in prompt_ids)
        return original(policy, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(rlino.rollout, "generate", recording)
    task = GSM8KTask()
    report = evaluate(bos_policy, task, EXAMPLES, template=template, max_new_tokens=3, batch_size=2)
    assert report.n == len(EXAMPLES)
    assert seen == encode_prompts(bos_policy.tokenizer, task, EXAMPLES, template)


@pytest.mark.parametrize("template", ["r1", "chat"])
def test_training_samples_from_the_same_ids(
    bos_policy: Policy, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training's rollouts (`rlino.step.sample_and_score`) start from the same prompt ids."""
    import rlino.step
    from rlino.rollout import SamplingConfig

    seen: list[list[int]] = []
    original = rlino.step.generate

    def recording(policy: Policy, prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        seen.extend(list(p) for p in prompt_ids)
        return original(policy, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(rlino.step, "generate", recording)
    task = GSM8KTask()
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=3)
    rlino.step.sample_and_score(
        bos_policy, task, template, EXAMPLES, 1, sampling, seed=0, backend="builtin"
    )
    assert seen == encode_prompts(bos_policy.tokenizer, task, EXAMPLES, template)
