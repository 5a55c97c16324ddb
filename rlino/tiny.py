"""The built-in tiny base model: a ~1M-parameter Llama pretrained from scratch on synthetic Countdown.

Why: the whole post-training pipeline (sample -> verify -> weigh -> update) must run on a 2-core CPU
in minutes. A real base model is far too slow there, so rlino ships a tiny one that behaves like a
base model on the task's `r1` prompt: always well-formed, right only sometimes, with thinking of
varying length (see `rlino.tiny_corpus` for how the traces make it improvable by RL).

- `pretrain(config, out)` builds the tokenizer and model, trains, and saves a standard HF directory
  (config.json, model.safetensors, tokenizer.json, ...) plus `rlino_task.json` with the task
  settings it was trained for; plain `transformers` loads it with no rlino import.
- `rlino.resolve.task_settings(model_dir)` reads those settings so eval/train default to them;
  `rlino.resolve.tiny_model_dir()` is the shipped model (`rlino/assets/tiny-countdown`).

The tokenizer is word-level: each number 0..999 is one token (never with a space, so a number is
one and the same token wherever it appears), so is every other ASCII character (with or without a
space on either side), and the prompt's fixed
boilerplate (the text between numbers that every prompt shares) is one added token per segment,
so an r1 Countdown prompt is 9 tokens and a completion 20-120.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlino.errors import UserError
from rlino.resolve import TASK_FILE
from rlino.tiny_corpus import TraceStyle, trace

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from rlino.tasks import Example, Task

TEMPLATE = "r1"
PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
PIECE_PATTERN = r"\d{1,3}| ?[^\s\d] ?|\s"
"""Pre-tokenizer pieces: 1-3 digits, or one other character with a space on either side.

Numbers never carry a space, so a number is the same token in the prompt's list, in the thinking
and in the answer: copying it is a plain token match.
"""

DEFAULT_TASK_OPTIONS: dict[str, Any] = {
    "num_numbers": 3,
    "min_number": 1,
    "max_number": 20,
    "max_target": 100,
}
"""Countdown settings the shipped model is trained for (smaller than the paper's 1..99)."""

SUPPORTED_TASKS = ("countdown",)


@dataclass
class PretrainConfig:
    """Everything that decides the pretrained model (same config + seed = same weights)."""

    task: str = "countdown"
    """Task whose r1 prompts the corpus uses; only countdown has a trace generator."""
    task_options: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TASK_OPTIONS))
    """Options for `get_task` (train-split settings; test instances are never trained on)."""
    seed: int = 0
    """Seeds the corpus, the initial weights and the batch order."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step (each a fresh synthetic prompt + trace)."""
    lr: float = 5e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (head size = hidden_size / num_heads)."""
    intermediate_size: int = 384
    """MLP width."""
    threads: int = 2
    """torch CPU threads (the target machine has 2 cores)."""
    whole_numbers: bool = True
    """Each number 0..999 is one token (else one token per digit)."""
    style: TraceStyle = field(default_factory=TraceStyle)
    """How sloppy the traced policy is (see rlino.tiny_corpus)."""


@dataclass
class PretrainResult:
    """What one pretraining run produced and measured."""

    out: Path
    parameters: int
    seconds: float
    final_loss: float


# ---- corpus ----


def _countdown_task(options: dict[str, Any]) -> Task:
    from rlino.tasks import get_task

    return get_task("countdown", **options)


def training_instances(task: Task, n: int, seed: int) -> list[Example]:
    """`n` fresh instances drawn with the task's train settings, none equal to a test instance."""
    from rlino.tasks.countdown import generate_instances, instance_key

    options = task.settings()
    banned = {instance_key(ex) for ex in task.examples("test")}
    rng = random.Random(f"rlino-tiny-corpus-{seed}")
    out: list[Example] = []
    while len(out) < n:
        batch = generate_instances(
            n - len(out),
            num_numbers=options["num_numbers"],
            min_number=options["min_number"],
            max_number=options["max_number"],
            max_target=options["max_target"],
            rng=rng,
        )
        out.extend(ex for ex in batch if instance_key(ex) not in banned)
    return out


def corpus(task: Task, n: int, seed: int, style: TraceStyle | None = None) -> list[tuple[str, str]]:
    """`n` (prompt, completion) pairs: the task's exact r1 prompt and a synthetic trace (no EOS)."""
    style = style or TraceStyle()
    rng = random.Random(f"rlino-tiny-traces-{seed}")
    pairs = []
    for example in training_instances(task, n, seed):
        prompt = task.prompt(example, TEMPLATE)
        pairs.append((prompt, trace(example["numbers"], int(example["target"]), rng, style)))
    return pairs


# ---- tokenizer ----


def boilerplate_segments(prompts: Sequence[str], min_length: int = 6) -> list[str]:
    """The stretches of text (digits included) that every prompt shares, as single tokens.

    Prompts are cut at numbers into pieces; a piece equal in all prompts is constant, and runs of
    constant pieces are merged. So the template's "for example <answer> (1 + 2) / 3 </answer>"
    becomes part of one token and the only numbers left in a prompt are the instance's own.
    """
    split = [re.split(r"(\d+)", p) for p in prompts]
    shape = Counter(len(pieces) for pieces in split).most_common(1)[0][0]
    split = [pieces for pieces in split if len(pieces) == shape]
    segments: set[str] = set()
    run = ""
    for i in range(shape):
        if all(pieces[i] == split[0][i] for pieces in split):
            run += split[0][i]
            continue
        segments.add(run)
        run = ""
    segments.add(run)
    return sorted(seg for seg in segments if len(seg) >= min_length)


def build_tokenizer(prompts: Sequence[str], whole_numbers: bool = True) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: numbers, ASCII characters, and the prompts' boilerplate.

    Any ASCII text round-trips exactly; text outside the boilerplate costs a token per character
    (a completion has no words, only numbers, operators and the four tags).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    digits = [str(i) for i in range(10)]
    numbers = list(digits)
    if whole_numbers:
        numbers += [a + b for a in digits for b in digits]
        numbers += [a + b for a in digits for b in numbers[10:]]
    pattern = PIECE_PATTERN if whole_numbers else PIECE_PATTERN.replace("{1,3}", "")
    chars = [chr(c) for c in range(33, 127) if not chr(c).isdigit()]
    spaced = [s for c in chars for s in (c, " " + c, c + " ", " " + c + " ")]
    pieces = [*numbers, *spaced, " ", "\n", "\t", "\r"]
    vocab: dict[str, int] = {}
    for piece in [PAD, EOS, UNK, *pieces]:
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    added = [*TAGS, *boilerplate_segments(prompts)]
    tok.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in added])
    tok.add_special_tokens([PAD, EOS, UNK])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=512,
    )


# ---- model and training ----


def build_model(config: PretrainConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A freshly initialised Llama causal LM sized by `config` (weights seeded by the caller).

    Llama, not Qwen2: transformers 5 loads a Qwen2 directory's tokenizer as `Qwen2Tokenizer`,
    which swaps in its own byte-level pre-tokenizer; for Llama it honours tokenizer.json as saved.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    answer_end = tokenizer.convert_tokens_to_ids("</answer>")
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(model_config)
    gen = model.generation_config
    gen.eos_token_id = [tokenizer.eos_token_id, answer_end]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = None
    return model


def _encode(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """Token ids of prompt + completion + EOS, and the prompt length (loss starts after it)."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + c + [eos], len(p)) for p, c in zip(prompts, completions, strict=True)]


def _length_buckets(
    rows: list[tuple[list[int], int]], batch_size: int, seed: int, group: int = 16
) -> list[list[tuple[list[int], int]]]:
    """Batches of similar length (less padding): sort within groups of `group` batches, shuffle."""
    rng = random.Random(f"rlino-tiny-batches-{seed}")
    batches = []
    span = batch_size * group
    for start in range(0, len(rows), span):
        block = sorted(rows[start : start + span], key=lambda row: len(row[0]))
        batches += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    return batches


def _batch(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, Any]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    import math

    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def validate(config: PretrainConfig) -> None:
    """Raise UserError for settings pretraining cannot honour."""
    if config.task not in SUPPORTED_TASKS:
        raise UserError(
            f"no tiny-model corpus for task {config.task!r}; supported: {', '.join(SUPPORTED_TASKS)}"
        )
    for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "threads"):
        if getattr(config, name) < 1:
            raise UserError(
                f"{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}"
            )
    if config.lr <= 0:
        raise UserError(f"lr must be positive, got {config.lr}")
    if config.hidden_size % config.num_heads:
        raise UserError(
            f"hidden-size {config.hidden_size} is not divisible by num-heads {config.num_heads}"
        )
    style = config.style
    for name in ("hit", "stop_on_hit", "give_up", "pick_hit"):
        if not 0.0 <= getattr(style, name) <= 1.0:
            raise UserError(f"style {name} must be in [0, 1], got {getattr(style, name)}")
    if style.closeness <= 0 or style.max_tries < 1:
        raise UserError(
            f"style closeness must be > 0 and max_tries >= 1 "
            f"(got {style.closeness}, {style.max_tries})"
        )


def pretrain(config: PretrainConfig, out: str | Path, progress: bool = True) -> PretrainResult:
    """Build corpus, tokenizer and model; train; save a standard HF model dir at `out`."""
    validate(config)
    import torch

    out = Path(out)
    task = _countdown_task(config.task_options)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    pairs = corpus(task, config.steps * config.batch_size, config.seed, config.style)
    tokenizer = build_tokenizer([p for p, _ in pairs[:200]], config.whole_numbers)
    batches = _length_buckets(_encode(tokenizer, pairs), config.batch_size, config.seed)
    model = build_model(config, tokenizer)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.steps))
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    with _progress_bar(progress, config.steps, "pretraining tiny model") as advance:
        for step in range(config.steps):
            loss = model(**_batch(batches[step], tokenizer.pad_token_id)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            advance(f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - start

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings = {
        "task": config.task,
        "template": TEMPLATE,
        "options": task.settings(),
        "pretrain": {**asdict(config), "seconds": round(seconds, 1)},
    }
    (out / TASK_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    final = sum(losses[-20:]) / len(losses[-20:])
    params = sum(p.numel() for p in model.parameters())
    return PretrainResult(out=out, parameters=params, seconds=seconds, final_loss=final)


class _progress_bar:
    """A rich progress bar with a status text; `advance(text)` moves it one step."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda text: None
        import sys

        if not sys.stderr.isatty():
            return self._log_lines()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.bar.start()
        task_id = self.bar.add_task(self.label, total=self.total, status="")
        return lambda text: self.bar.update(task_id, advance=1, status=text)

    def _log_lines(self) -> Any:
        """Without a terminal: one plain line every 5% of the steps (no silent wait in logs)."""
        import sys

        every, done, start = max(1, self.total // 20), 0, time.perf_counter()
        self.bar = None

        def advance(text: str) -> None:
            nonlocal done
            done += 1
            if done % every == 0 or done == self.total:
                elapsed = time.perf_counter() - start
                print(f"{self.label}: {done}/{self.total} {text} {elapsed:.0f} s", file=sys.stderr)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self.bar is not None:
            self.bar.stop()
