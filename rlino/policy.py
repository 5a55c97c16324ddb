"""Load any Hugging Face causal LM (local dir, hub id, GGUF) as a `Policy`, and score tokens with it.

`token_logprobs` is the one place the training step meets the vocabulary. A (B, L, V) float tensor
for a 49k-151k vocabulary is gigabytes, and on CPU most of the time goes to faulting those pages in,
so logits are computed only for completion positions, a chunk of rows at a time, and (when a
gradient is needed) recomputed in the backward pass instead of stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlino.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DEFAULT_CHUNK = 1024
"""completion tokens per logits chunk in token_logprobs (1024 x 49k fp32 logits = 200 MB)"""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
"""Files that can hold a model's weights (shards and their index included)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""Files one of which a tokenizer needs (or a file ending in .tiktoken or .model)."""


@dataclass
class Policy:
    """A causal LM with its tokenizer; eval/train mode is left to the caller."""

    model: PreTrainedModel
    """the causal LM"""
    tokenizer: PreTrainedTokenizerBase
    """its tokenizer, with a pad token and padding_side 'left'"""
    device: torch.device
    """where the model lives"""
    dtype: torch.dtype
    """the model's parameter dtype"""
    source: str
    """what was loaded: a directory, a hub id, or a .gguf file path"""


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; anything else must name an available device."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on cuda, fp32 elsewhere; otherwise fp32 / bf16 / fp16."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (use auto, fp32, bf16 or fp16)")
    return getattr(torch, DTYPES[dtype])


def _locate(spec: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Turn a spec into (directory or hub id, gguf file name or None), checking local paths."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(
                f"{spec} is a file but not a .gguf model; give a model directory instead"
            )
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise UserError(f"GGUF file {gguf_file} not found in {spec}")
            return str(path), gguf_file
        if (path / "config.json").is_file():
            _check_config_json(path / "config.json")
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        hint = (
            f"several .gguf files, pick one with gguf_file: {', '.join(ggufs)}"
            if ggufs
            else ("no config.json and no .gguf file")
        )
        raise UserError(f"cannot load a model from {spec}: {hint}")
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_local or not HUB_ID.match(spec):
        raise UserError(f"model path not found: {spec}")
    return spec, gguf_file


def _check_config_json(path: Path) -> None:
    """UserError naming `path` unless it is a readable JSON object (transformers' own message
    about a broken config.json comes out of the tokenizer loader and does not say which stage)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"cannot load a model from {path.parent}: {path.name} is not valid JSON ({e})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"cannot load a model from {path.parent}: {path.name} is not a JSON object")


def _files_like(where: str, names: tuple[str, ...], suffixes: tuple[str, ...]) -> list[str]:
    """Names of the files in local dir `where` called one of `names` or ending in `suffixes`."""
    path = Path(where)
    if not path.is_dir():
        return []
    return sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and (p.name in names or p.name.endswith(suffixes))
    )


def _load_error(
    spec: str, where: str, gguf_name: str | None, part: str, err: Exception
) -> UserError:
    """One line saying which `part` (tokenizer, weights) of model `spec` failed to load and why.

    A local HF directory that lacks the files of that part is named as such; otherwise the
    loader's message, its lines joined, cut to a readable length.
    """
    local = gguf_name is None and Path(where).is_dir()
    if part == "tokenizer":
        files = _files_like(where, TOKENIZER_FILES, (".tiktoken", ".model"))
        if local and not files:
            return UserError(
                f"cannot load a model from {spec}: no tokenizer files "
                f"({', '.join(TOKENIZER_FILES)} or a .tiktoken file)"
            )
    else:
        files = _files_like(where, (), WEIGHT_SUFFIXES)
        if local and not files:
            return UserError(
                f"cannot load a model from {spec}: config.json but no weights "
                "(model.safetensors or pytorch_model.bin)"
            )
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text or type(err).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    shown = f" ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''})" if files else ""
    return UserError(f"could not load the {part} of model {spec!r}{shown}: {text}")


def load_tokenizer(spec: str, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Only the tokenizer of the model `load_policy(spec)` would load (to check it early)."""
    where, gguf_name = _locate(spec, gguf_file)
    return _load_tokenizer(spec, where, gguf_name)


def _load_tokenizer(spec: str, where: str, gguf_name: str | None) -> PreTrainedTokenizerBase:
    """AutoTokenizer of a located model; every loader failure becomes a one-line UserError.

    Anything the loaders raise here is about the user's files (missing, corrupt, unsupported),
    and safetensors, tokenizers and transformers each raise their own exception types.
    """
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_name} if gguf_name else {}
    try:
        return AutoTokenizer.from_pretrained(where, **extra)
    except MemoryError:
        raise
    except Exception as err:
        raise _load_error(spec, where, gguf_name, "tokenizer", err) from err


def load_policy(
    spec: str, *, gguf_file: str | None = None, device: str = "auto", dtype: str = "auto"
) -> Policy:
    """Load a causal LM and its tokenizer from a local HF dir, a hub id, or a GGUF file.

    A GGUF model is de-quantised by transformers on load (needs the `gguf` package). The tokenizer
    gets padding_side 'left' and, if it has none, the EOS token as pad token.
    """
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    where, gguf_name = _locate(spec, gguf_file)
    extra = {"gguf_file": gguf_name} if gguf_name else {}
    tokenizer = _load_tokenizer(spec, where, gguf_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **extra)
    except MemoryError:
        raise
    except Exception as err:  # see _load_tokenizer
        raise _load_error(spec, where, gguf_name, "weights", err) from err
    model.to(device=torch_device, dtype=torch_dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of {spec!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    source = str(Path(where) / gguf_name) if gguf_name else where
    return Policy(
        model=model, tokenizer=tokenizer, device=torch_device, dtype=torch_dtype, source=source
    )


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn HF activation (gradient) checkpointing on or off; it only acts in train mode.

    transformers 5.x renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`;
    use whichever this version has. Non-reentrant checkpointing, so inputs need no requires_grad.
    """
    if enabled:
        enable = getattr(model, "activation_checkpointing_enable", None)
        enable = enable or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()


def save_policy(
    policy: Policy, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Save model (safetensors) and tokenizer to `out_dir` as a plain HF directory.

    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered
    whole by rlino.fsdp).

    A GGUF-loaded model refuses `save_pretrained` (its config carries a gguf quantization_config
    although the weights are already de-quantised), so such a model is rebuilt from its config
    without `quantization_config` and given the same state dict before saving.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = policy.model
    if (
        getattr(model.config, "quantization_config", None) is not None
        or getattr(model, "hf_quantizer", None) is not None
    ):
        config = model.config.__class__.from_dict(
            {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        )
        plain = AutoModelForCausalLM.from_config(config, dtype=policy.dtype)
        plain.load_state_dict(model.state_dict())
        if model.generation_config is not None:
            plain.generation_config = model.generation_config
        model = plain
    model.save_pretrained(out_dir, state_dict=state_dict)
    policy.tokenizer.save_pretrained(out_dir)


def decoder_hidden(model: PreTrainedModel, inputs: dict[str, object]) -> torch.Tensor:
    """The decoder's last hidden states (B, L, D) for the model inputs `inputs`, without logits.

    FSDP2 gathers the root's own weights (embeddings, final norm, head) in the root's forward
    only, so for a sharded root the whole model runs (one logit row) and the decoder's output is
    taken on the way; the root keeps those weights gathered until its backward, so the caller's
    head sees whole weights.
    """
    from rlino.fsdp import is_sharded

    if not is_sharded(model):
        return model.base_model(**inputs).last_hidden_state
    captured: list[torch.Tensor] = []
    hook = model.base_model.register_forward_hook(
        lambda _module, _args, out: captured.append(out.last_hidden_state)
    )
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[0]


def _completion_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Final hidden states at positions [start - 1, L - 1), the ones that predict the completion."""
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L) as in generation
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask.long(),
        "position_ids": positions,
        "use_cache": False,
    }
    return decoder_hidden(model, inputs)[:, start - 1 : -1]  # (B, Lc, D)


def _chunk_stats(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of targets, entropy) for a (n, D) chunk of hidden states; logits live only here."""
    import torch

    logits = head(hidden).float()  # (n, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(dim=-1)  # (n,)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - lse  # (n,)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    probs = (logits - lse[:, None]).exp()
    return logp, lse - (probs * logits).sum(dim=-1)


def head_stats(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(target | context), entropy of pi) at temperature T from (M, D) hidden states.

    Two (M,) tensors; the entropy is zeros unless `with_entropy`. A plain linear head without
    entropy goes through the fused selective log-softmax (`rlino.logprobs`); otherwise logits
    exist only for `chunk_size` rows at a time, and with grad enabled each chunk is
    checkpointed, so the backward pass recomputes its logits rather than keeping (M, V) alive.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    plain_head = isinstance(head, torch.nn.Linear) and head.bias is None
    if not with_entropy and plain_head and not softcap:
        from rlino.logprobs import selective_log_softmax

        # logits / T = (hidden / T) @ W.T: the temperature goes in before the fused head
        scaled = hidden if temperature == 1.0 else hidden / temperature
        logp = selective_log_softmax(scaled, head.weight, targets)  # (M,)
        return logp, torch.zeros_like(logp)
    logps, ents = [], []
    for i in range(0, hidden.shape[0], chunk_size):
        args = (
            hidden[i : i + chunk_size],
            targets[i : i + chunk_size],
            head,
            temperature,
            softcap,
            with_entropy,
        )
        if torch.is_grad_enabled() and hidden.requires_grad:
            logp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            logp, ent = _chunk_stats(*args)
        logps.append(logp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents)


def token_logprobs_and_entropy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token_t | prefix) and the entropy of pi(. | prefix) for completion positions.

    input_ids/attention_mask are (B, L) with prompts left-padded so every completion starts at
    column `completion_start`; returns two (B, L - completion_start) tensors. Logits exist only for
    `chunk_size` completion tokens at a time (`head_stats`). Differentiable.
    """
    if not 1 <= completion_start < input_ids.shape[1]:
        raise ValueError(
            f"completion_start must be in [1, {input_ids.shape[1]}), got {completion_start}"
        )
    hidden = _completion_hidden(model, input_ids, attention_mask, completion_start)
    batch, width, dim = hidden.shape
    logp, ent = head_stats(
        model,
        hidden.reshape(batch * width, dim),
        input_ids[:, completion_start:].reshape(-1),
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )
    return logp.view(batch, width), ent.view(batch, width)


def token_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, L - completion_start) log-probs of the completion tokens; see token_logprobs_and_entropy."""
    logp, _ = token_logprobs_and_entropy(
        model,
        input_ids,
        attention_mask,
        completion_start,
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=False,
    )
    return logp
