"""Typed training configuration: dataclasses, YAML presets and `key=value` overrides, strict validation.

One `TrainConfig` describes a run completely; the resolved config is written to `RUN_DIR/config.yaml`
and is all that `--resume` needs. The defaults are the tiny CPU Countdown demo, so
`rlino train --method grpo` needs no preset. Unknown keys, wrong types and impossible values raise
`UserError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlino.errors import UserError
from rlino.methods import MethodParams
from rlino.optimizers import OPTIMIZERS, lean_unavailable_reason
from rlino.resolve import looks_like_hub_id, path_exists

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
"""Where named presets live in a source checkout (`configs/NAME.yaml`)."""

INT_LIMIT = 2**63
"""Integers must fit in 64 bits (torch's seeds, counters and sizes); anything bigger is a typo."""
MAX_THREADS = 4096
"""Upper bound of `threads` (torch takes a C int; more threads than this is a typo)."""


@dataclass
class LoraConfig:
    """LoRA adapters trained (through peft) instead of every weight; see `rlino.lora`."""

    r: int = 16
    """Rank of each adapter: the adapted weight is W + (alpha / r) B A with A (r x in), B (out x r)."""
    alpha: float = 32.0
    """Scale numerator of the adapters' update (alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapters' input in the update's passes (0: the policy differentiated is
    exactly the one that sampled, as without LoRA)."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: names such as [q_proj, v_proj] (matched as suffixes), or
    all-linear (every linear layer except the output head)."""

    def validate(self, backend: str = "builtin") -> None:
        """Raise UserError for impossible values (names are checked against the model when built)."""
        names = self.target_modules
        names_ok = (
            bool(names.strip())
            if isinstance(names, str)
            else bool(names) and all(isinstance(n, str) and n.strip() for n in names)
        )
        checks: list[tuple[bool, str]] = [
            (self.r >= 1, f"model.lora.r must be >= 1 (got {self.r})"),
            (self.alpha > 0, f"model.lora.alpha must be > 0 (got {self.alpha})"),
            (0 <= self.dropout < 1, f"model.lora.dropout must be in [0, 1) (got {self.dropout})"),
            (
                names_ok,
                "model.lora.target_modules must be all-linear or a non-empty list of module "
                f"names, got {_show(names)}",
            ),
            (
                backend != "vllm",
                "model.lora does not work with rollout.backend vllm (it pushes full weights)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class ModelConfig:
    """Which policy to train."""

    path: str | None = None
    """HF model dir, hub id or .gguf file; None = the built-in tiny Countdown base."""
    gguf_file: str | None = None
    """GGUF file name inside `path`, when `path` is a directory of GGUF files."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."""
    master_dtype: str = "fp32"
    """Trained weights and optimizer state: fp32 (mixed precision under a bf16/fp16 dtype) or same."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    attention: str = "auto"
    """Attention implementation of the policy and reference: auto (the model's own default,
    usually sdpa), sdpa or eager (transformers' `attn_implementation`; on CPU eager can be the
    faster for short training rows, `benchmarks/bench_update.py` measures it)."""
    lora: LoraConfig | None = None
    """LoRA adapters to train instead of every weight; None = full fine-tuning."""


@dataclass
class TaskConfig:
    """What the policy is trained on."""

    name: str = "countdown"
    """Registered task name (countdown, gsm8k, or a user task)."""
    template: str | None = None
    """Prompt template (r1, plain, chat); None = the model's recorded one, else the task's default."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task options (e.g. num_numbers, max_number, path); the tiny model's recorded ones fill gaps."""


@dataclass
class RolloutConfig:
    """How samples are drawn each iteration."""

    backend: str = "builtin"
    """Sampling engine: builtin (KV-cache sampler), hf (transformers generate) or vllm."""
    prompts_per_iter: int = 16
    """P: prompts per iteration."""
    samples_per_prompt: int = 8
    """G: samples per prompt (the group)."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    max_new_tokens: int = 128
    """Completion length cap in tokens."""
    ignore_eos: bool = False
    """Sample past EOS up to max_new_tokens (benchmarks use it to force equal lengths)."""
    on_truncation: str = "keep"
    """Samples cut at max_new_tokens: keep (scored as any other), zero_reward (reward 0, counted
    wrong) or mask (DAPO's overlong filtering: no gradient from them, still in the metrics)."""


@dataclass
class OptimConfig:
    """Optimiser and update schedule."""

    optimizer: str = "adamw"
    """adamw: torch's AdamW (fp32 moments, 8 bytes per parameter); adamw8bit: torchao's 8-bit
    AdamW, moments in 8 bits with a scale per block of 256 (about 2 bytes per parameter), the
    memory-lean mode; needs `pip install torchao` and a C++ compiler (rlino.optimizers)."""
    lr: float = 2e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "constant"
    """Learning-rate schedule after warmup: constant, linear or cosine (decay to 0 at the end)."""
    warmup_iters: int = 0
    """Linear warmup length in iterations."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    minibatch_size: int = 64
    """Samples per optimiser step; a rollout batch of P*G samples gives ceil(P*G / this) steps."""
    micro_batch_size: int = 64
    """Max samples per forward/backward pass (gradient accumulation inside a minibatch)."""
    micro_batch_tokens: int = 8192
    """Max tokens per forward/backward pass, the memory knob; 0 = no cap. Padded (rows x width)
    with packing none; real tokens (a shared prompt once) with pack or prefix."""
    packing: str = "none"
    """How a micro-batch is laid out (same log-probs and gradient, less compute; rlino.packing):
    none: rows padded to the longest prompt and completion; pack: the rows' real tokens back to
    back in a few packed sequences, attention kept within each row (any attention implementation);
    prefix: as pack, and the samples of one prompt share a single copy of it (sdpa or eager
    attention, full-attention models only)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass: less memory, about 1/3 more compute."""
    max_nonfinite_steps: int = 3
    """Stop the run after this many consecutive optimiser steps with a NaN/inf loss or gradient
    (each is skipped, weights and optimiser state untouched); fp16 loss-scale overflows don't count."""


@dataclass
class EvalConfig:
    """Periodic evaluation on a fixed test subset (greedy pass@1)."""

    every: int = 10
    """Evaluate every N iterations (and always at the start and the end); 0 = only start and end."""
    num_examples: int = 200
    """Test examples used (the first N of the test split)."""
    batch_size: int = 128
    """Prompts per sampling batch during evaluation."""


@dataclass
class AnalysisConfig:
    """Measurements taken during training."""

    equivalence_every: int = 0
    """Every N iterations, compare at each optimiser step the gradient of the update taken with that
    of the plain weighted likelihood with the same weights (equiv/...); 0 = never."""


@dataclass
class DistConfig:
    """Data-parallel training under torchrun (ignored when one process runs)."""

    strategy: str = "ddp"
    """ddp: each rank holds the whole model and a share of the prompts; gradients are summed
    across ranks before every optimiser step (rlino.distributed). fsdp: FSDP2 shards the fp32
    weights, gradients and optimiser state over the ranks (rlino.fsdp)."""


@dataclass
class TrainConfig:
    """A complete training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodParams = field(default_factory=MethodParams)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    iterations: int = 200
    """Number of sample -> verify -> weigh -> update iterations."""
    seed: int = 0
    """Seed for prompt order, sampling and initialisation of anything random."""
    checkpoint_every: int = 25
    """Save a resumable checkpoint every N iterations (and at the end); 0 = only at the end."""
    checkpoint_keep: int = 2
    """Keep the newest N checkpoints (older ones are the fallback when a newer one is damaged)."""
    samples_every: int = 10
    """Append a few completions to samples.jsonl every N iterations (0 = never)."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)."""
    keep_freed_memory: bool = True
    """Keep freed host memory in the process for reuse instead of returning it to the OS (glibc
    only; saves re-faulting the update's large temporaries every micro-batch; rlino.allocator)."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard events to RUN_DIR/tb."""

    def validate(self) -> None:
        """Raise UserError for impossible values, before any work."""
        r, o, e = self.rollout, self.optim, self.eval
        checks: list[tuple[bool, str]] = [
            (self.iterations >= 1, "iterations must be >= 1"),
            (r.prompts_per_iter >= 1, "rollout.prompts_per_iter must be >= 1"),
            (r.samples_per_prompt >= 1, "rollout.samples_per_prompt must be >= 1"),
            (r.temperature >= 0, "rollout.temperature must be >= 0"),
            (0 < r.top_p <= 1, "rollout.top_p must be in (0, 1]"),
            (r.top_k >= 0, "rollout.top_k must be >= 0"),
            (r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1"),
            (r.backend in ("builtin", "hf", "vllm"), "rollout.backend must be builtin, hf or vllm"),
            (
                r.on_truncation in ("keep", "zero_reward", "mask"),
                "rollout.on_truncation must be keep, zero_reward or mask",
            ),
            (
                self.analysis.equivalence_every >= 0,
                "analysis.equivalence_every must be >= 0 (0 = never)",
            ),
            (self.dist.strategy in ("ddp", "fsdp"), "dist.strategy must be ddp or fsdp"),
            (
                o.optimizer in OPTIMIZERS,
                f"optim.optimizer must be one of {', '.join(OPTIMIZERS)} (got {_show(o.optimizer)})",
            ),
            (
                not (o.optimizer == "adamw8bit" and self.dist.strategy == "fsdp"),
                "optim.optimizer adamw8bit does not work with dist.strategy fsdp (use ddp)",
            ),
            (o.lr > 0, f"optim.lr must be > 0 (got {o.lr})"),
            (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (
                o.schedule in ("constant", "linear", "cosine"),
                "optim.schedule must be constant, linear or cosine",
            ),
            (o.warmup_iters >= 0, "optim.warmup_iters must be >= 0"),
            (o.grad_clip >= 0, "optim.grad_clip must be >= 0"),
            (o.minibatch_size >= 1, "optim.minibatch_size must be >= 1"),
            (o.micro_batch_size >= 1, "optim.micro_batch_size must be >= 1"),
            (o.micro_batch_tokens >= 0, "optim.micro_batch_tokens must be >= 0 (0 = no cap)"),
            (
                self.model.attention in ("auto", "sdpa", "eager"),
                f"model.attention must be auto, sdpa or eager (got {_show(self.model.attention)})",
            ),
            (
                o.packing in ("none", "pack", "prefix"),
                f"optim.packing must be none, pack or prefix (got {_show(o.packing)})",
            ),
            (o.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps must be >= 1"),
            (e.every >= 0, "eval.every must be >= 0"),
            (e.num_examples >= 1, "eval.num_examples must be >= 1"),
            (e.batch_size >= 1, "eval.batch_size must be >= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.checkpoint_keep >= 1, "checkpoint_keep must be >= 1"),
            (self.samples_every >= 0, "samples_every must be >= 0"),
            (0 <= self.seed < 2**32, f"seed must be in [0, 2**32) (got {self.seed})"),
            (
                0 <= self.threads <= MAX_THREADS,
                f"threads must be in [0, {MAX_THREADS}] (0 = torch's default; got {self.threads})",
            ),
            (
                self.model.dtype in ("auto", "fp32", "bf16", "fp16"),
                "model.dtype must be auto, fp32, bf16 or fp16",
            ),
            (
                self.model.master_dtype in ("fp32", "same"),
                "model.master_dtype must be fp32 or same",
            ),
            (
                self.model.device in ("auto", "cpu", "cuda")
                or re.fullmatch(r"cuda:\d+", self.model.device) is not None,
                "model.device must be auto, cpu or cuda[:N]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if o.optimizer == "adamw8bit" and (reason := lean_unavailable_reason()) is not None:
            raise UserError(reason)
        if self.model.lora is not None:
            self.model.lora.validate(backend=r.backend)
        path = self.model.path
        if path is not None and not looks_like_hub_id(path) and not path_exists(path):
            raise UserError(f"model.path {_show(path)} does not exist")
        self.method.validate(group_size=r.samples_per_prompt)


# ---------------------------------------------------------------- building from dicts


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise UserError(
                f"unknown config key {_show(path)}; known here: {', '.join(sorted(names))}"
            )
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Check (and gently convert) `value` to type `hint`; UserError naming `path` if impossible."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{path}: bad value {_show(value)}")
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path} must be a mapping, got {_show(value)}")
        _check_plain(value, path)
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{path} must be true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UserError(f"{path} must be an integer, got {_show(value)}")
        try:
            number = int(value)
        except ValueError:  # also a string of more than 4300 digits
            raise UserError(f"{path} must be an integer, got {_show(value)}") from None
        if not -INT_LIMIT <= number < INT_LIMIT:
            raise UserError(f"{path} must be an integer of at most 64 bits, got {_show(value)}")
        return number
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise UserError(f"{path} must be a number, got {_show(value)}")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"{path} must be a number, got {_show(value)}") from None
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):  # NaN or inf would poison every step (or pass no check)
            raise UserError(f"{path} must be a finite number, got {_show(value)}")
        return number
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise UserError(f"{path} must be a string, got {_show(value)}")
        return str(value)
    return value


def _check_plain(value: Any, path: str) -> None:
    """UserError unless `value` is plain data (text, finite numbers, lists, mappings), no cycles.

    What a config holds is written to config.yaml and compared across runs; a YAML tag such as
    `!!binary`, a date, NaN or a self-referencing anchor would break that later, far from here.
    """
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        raise UserError(
            f"{path} must hold plain values (text, finite numbers, lists, mappings), "
            f"got {_show(value)}"
        ) from None


def _show(value: Any, limit: int = 60) -> str:
    """`repr(value)` on one line, cut to about `limit` characters (a pasted file stays readable)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML and JSON)."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------- presets and overrides


def preset_path(name_or_path: str) -> Path:
    """Resolve a preset: an existing YAML file, or a name in `configs/` (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / (
        name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml"
    )
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise UserError(
        f"config {name_or_path!r} not found (a YAML path, or one of: {', '.join(known) or 'none'})"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; an `extends: other` key merges the named preset underneath."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a YAML mapping")
    _check_finite_depth(data, str(path))
    parent = data.pop("extends", None)
    if parent:
        data = deep_merge(read_yaml(preset_path(str(parent))), data)
    return data


def _check_finite_depth(value: Any, where: str) -> None:
    """UserError if a YAML value refers to itself (`&a [*a]`) or nests absurdly deep.

    Merging or writing such a value would recurse without end; no config needs one.
    """
    try:
        json.dumps(value, default=repr, skipkeys=True)
    except (ValueError, RecursionError):  # "Circular reference detected", or far too deep
        raise UserError(f"{where}: a value that refers to itself or nests too deep") from None


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` on top of `base`, merging nested mappings."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is read as YAML (so 3, true, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {_show(text)} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):
        # not YAML (or a number PyYAML cannot hold, or nesting too deep): keep the text as given,
        # and let the field's type decide whether text will do
        value = raw
    _check_finite_depth(value, f"override {_show(key.strip())}")
    node: dict[str, Any] = {}
    out = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def parse_task_options(items: list[str]) -> dict[str, Any]:
    """`key=value` task options (`--task-opt`); values read as YAML scalars, so 3, true, 1e-3 stay numbers."""
    options: dict[str, Any] = {}
    for item in items:
        options.update(parse_override(item))
    return options


def load_config(
    preset: str | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the preset (if any), then overrides; validated."""
    data: dict[str, Any] = read_yaml(preset_path(preset)) if preset else {}
    if isinstance(overrides, dict):
        data = deep_merge(data, overrides)
    else:
        for text in overrides or []:
            data = deep_merge(data, parse_override(text))
    config = from_dict(TrainConfig, data)
    config.validate()
    return config


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomic)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)
