"""The vLLM backend (optional): fast GPU sampling when `vllm` is installed.

The engine is built once per policy source and cached; before each call the current policy weights
are pushed into it, so it samples from the policy being trained, not the checkpoint on disk.
Sampling log-probs come from vLLM (`logprobs=0` returns the chosen token's log-prob).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from rlino.errors import UserError
from rlino.rollout import Rollouts, SamplingConfig, left_pad, stop_ids

if TYPE_CHECKING:
    from rlino.policy import Policy

_ENGINES: dict[str, Any] = {}


def _engine(policy: Policy) -> Any:
    """One vLLM engine per policy source, created on first use."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError("rollout backend 'vllm' needs the vllm package (pip install 'rlino[vllm]')")
    if policy.device.type != "cuda":
        raise UserError("rollout backend 'vllm' needs the policy on a CUDA device")
    if policy.source not in _ENGINES:
        from vllm import LLM

        dtype = str(policy.dtype).removeprefix("torch.")
        _ENGINES[policy.source] = LLM(
            model=policy.source, dtype=dtype, gpu_memory_utilization=0.3, enable_prefix_caching=True
        )
    return _ENGINES[policy.source]


def _push_weights(llm: Any, policy: Policy) -> None:
    """Copy the policy's current weights into the engine (API differs across vLLM versions)."""
    weights = list(policy.model.state_dict().items())
    try:
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError as err:
        raise UserError("this vLLM version does not expose its model for weight updates") from err
    model.load_weights(weights)


def generate_vllm(
    policy: Policy,
    prompt_ids: list[list[int]],
    num_samples: int,
    config: SamplingConfig,
    *,
    seed: int,
) -> Rollouts:
    """Sample with vLLM; see `rlino.rollout.generate` for the contract (CPU tensors out)."""
    llm = _engine(policy)
    import torch
    from vllm import SamplingParams

    _push_weights(llm, policy)
    stops = stop_ids(policy, config)
    params = SamplingParams(
        n=num_samples,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k if config.top_k > 0 else -1,
        max_tokens=config.max_new_tokens,
        stop=list(config.stop_strings),
        stop_token_ids=stops,
        ignore_eos=config.ignore_eos,
        include_stop_str_in_output=True,
        seed=seed,
        logprobs=0,
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    pad_id = int(policy.tokenizer.pad_token_id)
    padded, pad_mask = left_pad(prompt_ids, pad_id)
    samples = [s for out in outputs for s in out.outputs]
    width = max(1, max(len(s.token_ids) for s in samples))
    completion = torch.full((len(samples), width), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((len(samples), width), dtype=torch.bool)
    logprobs = torch.zeros((len(samples), width))
    for r, s in enumerate(samples):
        n = len(s.token_ids)
        completion[r, :n] = torch.tensor(list(s.token_ids), dtype=torch.long)
        comp_mask[r, :n] = True
        if s.logprobs:
            logprobs[r, :n] = torch.tensor(
                [step[tok].logprob for step, tok in zip(s.logprobs, s.token_ids, strict=True)]
            )
    return Rollouts(
        prompt_ids=torch.tensor(padded).repeat_interleave(num_samples, dim=0),
        prompt_mask=torch.tensor(pad_mask).repeat_interleave(num_samples, dim=0),
        completion_ids=completion,
        completion_mask=comp_mask,
        finished=torch.tensor([s.finish_reason == "stop" for s in samples]),
        prompt_index=torch.arange(len(prompt_ids)).repeat_interleave(num_samples),
        logprobs=logprobs,
        stop_strings=config.stop_strings,
    )
