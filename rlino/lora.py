"""LoRA training through peft: only low-rank adapters train; the base weights stay frozen, held once.

`model.lora` in the training config (r, alpha, dropout, target_modules) turns it on; absent or null
means full fine-tuning. What changes, and why:

- the policy: peft's `get_peft_model` puts adapter layers into the loaded model, in place, and
  freezes every base weight, so the optimiser (which takes the parameters with requires_grad) holds
  only the adapters. `Policy.model` stays the Hugging Face model (now with the adapter layers in
  it), so sampling, scoring and the update run it as they run any model; the PeftModel around it is
  kept in `LoraPolicy.peft` for what needs peft: switching the adapters off, saving, loading.
- the KL reference: the same model with its adapters switched off (peft's `disable_adapter()`),
  seen through `AdaptersOff`, so the base weights are in memory once; without LoRA the reference
  is a second full copy.
- precision: with a bf16/fp16 compute dtype and fp32 master weights (the default), the frozen base
  is loaded in the compute dtype and the adapters, the only weights that train, are kept in fp32
  (peft's adapter autocast). So there is neither an fp32 copy of weights that never change nor a
  compute copy (`rlino.precision.ComputeCopy`) to refresh: each adapted layer runs the base matmul
  in the compute dtype and the adapter's in fp32 (peft casts its input up and the sum back).
  fp16 keeps its loss scaling. With `master_dtype: same` the adapters are in the compute dtype too.
- checkpoints: `checkpoints/iter_N/model/` holds the adapter alone (peft's
  `adapter_model.safetensors` and `adapter_config.json`); `--resume` loads the base model again and
  these adapter weights into it, bit for bit.
- `final/`: the adapters added into the base weights, a plain HF directory in the master dtype that
  loads without peft (`rlino eval --model RUN/final`); `final/adapter/` is the adapter alone, in
  peft's format, to apply to the base model with `PeftModel.from_pretrained`.
- sampling: the built-in sampler steps through the model's own forward (its fused lean decode step
  would read the base weights only, so it declines adapted models); the vLLM backend, which is
  pushed full weights, is refused.

Adapters on the input embeddings or the output head are refused: with tied embeddings their merge
would change both, and the reference's head must be the base one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlino.errors import UserError
from rlino.policy import Policy, load_policy, save_policy

if TYPE_CHECKING:
    from peft import PeftModel

    from rlino.config import ModelConfig
    from rlino.precision import Precision
    from rlino.resolve import Target

ADAPTER_DIR = "adapter"
"""`final/adapter/`: the trained adapter alone (peft format), beside the merged model in `final/`"""
ADAPTER_FILE = "adapter_model.safetensors"
"""the file peft writes the adapter weights to"""


@dataclass
class LoraPolicy(Policy):
    """A policy whose model carries peft LoRA adapters; `model` is the adapted HF model itself."""

    peft: PeftModel
    """the PeftModel around `model`: switches the adapters off, saves and loads them"""


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to about `limit` characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_adapter_layer(module: object) -> bool:
    """Is `module` one of peft's adapter layers (which wrap the original as `base_layer`)?"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def load_lora_policy(
    target: Target, model_config: ModelConfig, precision: Precision, weights: Path | None = None
) -> LoraPolicy:
    """The base model of `target` with the LoRA adapters of `model_config.lora`: fresh ones, or
    those saved in `weights`.

    The base is loaded on `model_config.device` in the compute dtype and frozen; the adapters are
    kept in the master dtype (fp32 by default), the precision their small updates need. `weights`
    is a checkpoint's model dir holding an adapter (`save_checkpoint_model`); the base always comes
    from `target`. Module names that match nothing, or layers peft cannot adapt, give a one-line
    UserError.
    """
    import peft

    lora = model_config.lora
    if lora is None:
        raise ValueError("load_lora_policy needs model.lora")
    compute = str(precision.compute).removeprefix("torch.")  # "bfloat16" etc.
    base = load_policy(
        target.model_path, gguf_file=target.gguf_file, device=model_config.device, dtype=compute
    )
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            model = peft.get_peft_model(
                base.model, config, autocast_adapter_dtype=precision.master == torch.float32
            )
    except (ValueError, TypeError, KeyError) as err:  # no match, an unsupported layer type
        raise UserError(f"model.lora: {_one_line(err)}") from None
    hf_model = model.get_base_model()
    if any(
        _is_adapter_layer(layer)
        for layer in (hf_model.get_input_embeddings(), hf_model.get_output_embeddings())
    ):
        raise UserError(
            "model.lora: adapters on the input embeddings or the output head are not supported; "
            "name the layers to adapt in model.lora.target_modules (e.g. [q_proj, v_proj])"
        )
    if weights is not None:
        load_adapter(model, Path(weights))
    return LoraPolicy(
        model=hf_model,
        tokenizer=base.tokenizer,
        device=base.device,
        dtype=base.dtype,
        source=base.source,
        peft=model,
    )


def load_adapter(model: PeftModel, directory: Path) -> None:
    """Put the adapter saved in `directory` into `model`, exactly.

    UserError when `directory` holds no adapter (a run without LoRA) or one of another shape (other
    r or target modules than the config's).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = directory / ADAPTER_FILE
    if not file.is_file():
        raise UserError(
            f"{directory} holds no LoRA adapter ({ADAPTER_FILE}) but the config sets model.lora: "
            "resume a run with the settings it was trained with"
        )
    saved = load_file(str(file))
    expected = get_peft_model_state_dict(model, save_embedding_layers=False)
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in saved):
        raise UserError(
            f"the LoRA adapter in {directory} does not fit model.lora (other r or target_modules "
            "than it was trained with)"
        )
    result = set_peft_model_state_dict(model, saved)
    if result.unexpected_keys:
        raise UserError(f"the LoRA adapter in {directory} does not fit the model")


class AdaptersOff(torch.nn.Module):
    """The adapted model with its adapters switched off: the frozen base, without a second copy.

    Stands in for the reference model wherever rlino scores tokens (`rlino.policy.token_logprobs`
    reads `base_model`, `get_output_embeddings()` and `config`; a plain call runs the whole model).
    Every pass runs under peft's `disable_adapter()`, which also keeps the adapters out of the
    autograd graph. The adapted model is not registered as a submodule, so `eval()`,
    `requires_grad_(False)` or `parameters()` here never touch the policy being trained.
    """

    def __init__(self, model: PeftModel) -> None:
        super().__init__()
        object.__setattr__(self, "peft", model)  # not a submodule (see the class docstring)
        self.config = model.get_base_model().config

    @property
    def hf_model(self) -> torch.nn.Module:
        """The adapted Hugging Face model (shared with the policy)."""
        return self.peft.get_base_model()

    def _trunk(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft.disable_adapter():
            return self.hf_model.base_model(*args, **kwargs)

    @property
    def base_model(self) -> Any:
        """The transformer trunk (hidden states), run with the adapters off."""
        return self._trunk

    def get_output_embeddings(self) -> torch.nn.Module:
        """The output head (never adapted: `load_lora_policy` refuses adapters there)."""
        return self.hf_model.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The whole causal LM (logits) with the adapters off."""
        with self.peft.disable_adapter():
            return self.hf_model(*args, **kwargs)


def reference(policy: LoraPolicy) -> Policy:
    """The frozen KL reference of a LoRA run: the policy's own model with the adapters off."""
    return Policy(
        model=AdaptersOff(policy.peft),
        tokenizer=policy.tokenizer,
        device=policy.device,
        dtype=policy.dtype,
        source=policy.source,
    )


def adapter_dtype(policy: LoraPolicy) -> torch.dtype:
    """The dtype of the trained adapter weights (the master dtype)."""
    return next(p.dtype for p in policy.model.parameters() if p.requires_grad)


@torch.no_grad()
def merged_state_dict(policy: LoraPolicy) -> dict[str, torch.Tensor]:
    """The state dict of the plain model (no peft) that computes what the adapted one does.

    Each adapted layer's weight is its base weight plus peft's `get_delta_weight` (alpha / r) B A,
    summed in the adapters' dtype; every other tensor is the model's own (not copied).
    """
    model = policy.model
    merged: dict[str, torch.Tensor] = {}
    inside_adapted: set[str] = set()
    dtype = adapter_dtype(policy)
    for name, layer in model.named_modules():
        if not _is_adapter_layer(layer):
            continue
        prefix = f"{name}." if name else ""
        inside_adapted.update(prefix + key for key in layer.state_dict())
        for key, value in layer.get_base_layer().state_dict().items():
            merged[prefix + key] = value
        weight = merged[prefix + "weight"].to(dtype)
        for adapter in layer.active_adapters:
            weight = weight + layer.get_delta_weight(adapter).to(dtype)
        merged[prefix + "weight"] = weight
    for key, value in model.state_dict().items():
        if key not in inside_adapted:
            merged[key] = value
    return merged


def save_merged(policy: LoraPolicy, out_dir: Path) -> None:
    """Write the adapters merged into the base as a plain HF directory (model and tokenizer),
    in the adapters' dtype (fp32 by default); the live model is left as it is."""
    from transformers import AutoModelForCausalLM

    model = policy.model
    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )  # a GGUF-loaded base carries one although its weights are de-quantised (see save_policy)
    dtype = adapter_dtype(policy)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(merged_state_dict(policy))
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    save_policy(
        Policy(
            model=plain,
            tokenizer=policy.tokenizer,
            device=policy.device,
            dtype=dtype,
            source=policy.source,
        ),
        out_dir,
    )


def save_adapter(policy: LoraPolicy, out_dir: Path) -> None:
    """Write the adapter alone in peft's format (`adapter_model.safetensors`, `adapter_config.json`).

    `save_embedding_layers=False`: only the adapter weights (peft's "auto" would look the base model
    up, on the Hub for a GGUF-loaded one, to decide whether to add the full embeddings).
    """
    policy.peft.save_pretrained(str(out_dir), save_embedding_layers=False)


def save_checkpoint_model(policy: Policy, out_dir: Path) -> None:
    """A checkpoint's `model/`: the adapter alone for a LoRA policy, else the whole model."""
    if isinstance(policy, LoraPolicy):
        save_adapter(policy, out_dir)
    else:
        save_policy(policy, out_dir)


def save_final_model(policy: Policy, out_dir: Path) -> None:
    """A finished run's `final/`: a plain HF directory; for a LoRA policy the merged model, with
    the adapter alone in `final/adapter/`."""
    if isinstance(policy, LoraPolicy):
        save_merged(policy, out_dir)
        save_adapter(policy, Path(out_dir) / ADAPTER_DIR)
    else:
        save_policy(policy, out_dir)
