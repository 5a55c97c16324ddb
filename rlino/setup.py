"""Build everything a training run needs from its config: policy, reference, task, data, optimiser.

`build(config)` loads once what the loop then uses every iteration; `make_optimizer` and
`make_scheduler` give the optimiser (rlino.optimizers) and the per-iteration learning-rate
schedule. Nothing here samples or updates; that is `rlino.step`.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from rlino import fsdp, lora, optimizers
from rlino.allocator import keep_freed_memory
from rlino.config import TrainConfig
from rlino.distributed import World
from rlino.errors import UserError
from rlino.methods import Method, MethodParams, resolve
from rlino.policy import (
    Policy,
    load_policy,
    resolve_device,
    resolve_dtype,
    set_activation_checkpointing,
)
from rlino.precision import ComputeCopy, resolve_precision
from rlino.resolve import Target, resolve_target
from rlino.tasks import Example, Task, get_task, get_template


@dataclass
class Setup:
    """Everything a run needs, built once from the config."""

    config: TrainConfig
    policy: Policy
    """the trained model, its weights in the master dtype"""
    reference: Policy | None
    """the frozen KL reference (only when the method uses KL and beta > 0)"""
    task: Task
    template: str
    method: Method
    params: MethodParams
    """the method's parameters with any preset expanded"""
    train_examples: list[Example]
    eval_examples: list[Example]
    compute_copy: ComputeCopy | None = None
    """the policy in the compute dtype, under mixed precision (None: `policy` computes itself)"""
    scaler: torch.amp.GradScaler = dataclasses.field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )
    """fp16 loss scaling (see rlino.precision); disabled otherwise"""
    nonfinite_streak: int = 0
    """consecutive optimiser steps skipped for a NaN/inf loss or gradient"""
    world: World = dataclasses.field(default_factory=World)
    """this process's rank among the data-parallel ranks (one process: rank 0 of 1)"""

    @property
    def compute_policy(self) -> Policy:
        """The model that does the arithmetic: sampling, evaluation, the update's passes."""
        return self.policy if self.compute_copy is None else self.compute_copy.policy

    def whole_weights(self) -> AbstractContextManager[None]:
        """Context in which the compute policy's weights are whole (gathered, under fsdp), for
        sampling and evaluation; a no-op otherwise."""
        return fsdp.gathered(self.compute_policy.model)


def target_of(config: TrainConfig) -> Target:
    """The (model, task) a training config means, with the model's recorded task settings."""
    return resolve_target(
        config.model.path,
        config.task.name,
        gguf_file=config.model.gguf_file,
        task_options=config.task.options,
        template=config.task.template,
    )


def build(config: TrainConfig, weights: Path | None = None, world: World | None = None) -> Setup:
    """Load the policy (and the frozen reference when beta > 0), the task and its data.

    `weights` (a checkpoint's model dir) replaces the policy's starting weights; the reference
    always comes from the base model. Under several ranks (`world`) every rank loads the same
    weights and then takes rank 0's, so the replicas start identical.
    """
    world = world or World()
    if config.keep_freed_memory:
        keep_freed_memory()
    if world.size > config.rollout.prompts_per_iter:
        raise UserError(
            f"{world.size} ranks need rollout.prompts_per_iter >= {world.size} "
            f"(got {config.rollout.prompts_per_iter}): each rank samples whole prompts"
        )
    target = target_of(config)
    task = get_task(target.task, **target.task_options)
    template = target.template or task.default_template
    get_template(template)
    method, params = resolve(config.method)
    if params.aggregation == "constant" and params.constant_length is None:
        params = dataclasses.replace(params, constant_length=config.rollout.max_new_tokens)
    precision = resolve_precision(
        resolve_dtype(config.model.dtype, resolve_device(config.model.device)),
        config.model.master_dtype,
    )
    master_dtype = str(precision.master).removeprefix("torch.")  # "float32" etc.
    source = (str(weights), None) if weights is not None else (target.model_path, target.gguf_file)
    if config.model.lora is not None:  # base frozen in the compute dtype, adapters in the master's
        policy = lora.load_lora_policy(target, config.model, precision, weights)
    else:
        policy = load_policy(
            source[0], gguf_file=source[1], device=config.model.device, dtype=master_dtype
        )
    if config.model.attention != "auto":  # before the compute copy, which copies the choice
        policy.model.set_attn_implementation(config.model.attention)
    if world.sharded:
        fsdp.check_supported(
            lora=config.model.lora is not None,
            precision=precision,
            equivalence_every=config.analysis.equivalence_every,
        )
    # LoRA needs no copy (see rlino.lora); FSDP2 casts for compute itself (rlino.fsdp)
    mixed = precision.mixed and config.model.lora is None and not world.sharded
    compute_copy = ComputeCopy(policy, precision.compute) if mixed else None
    if config.optim.gradient_checkpointing:
        # Only active in train mode (the update); sampling and evaluation run in eval mode.
        compute_model = policy.model if compute_copy is None else compute_copy.policy.model
        set_activation_checkpointing(compute_model, True)
    reference = None
    if method.uses_kl and params.beta > 0 and isinstance(policy, lora.LoraPolicy):
        reference = lora.reference(policy)  # the policy's own weights, adapters off: no copy
    elif method.uses_kl and params.beta > 0:
        reference = load_policy(
            target.model_path,
            gguf_file=target.gguf_file,
            device=config.model.device,
            dtype=config.model.dtype,
        )
        reference.model.eval().requires_grad_(False)
        if config.model.attention != "auto":
            reference.model.set_attn_implementation(config.model.attention)
    train_examples = task.examples("train")
    eval_examples = task.examples("test")[: config.eval.num_examples]
    if not train_examples:
        raise UserError(f"task {config.task.name!r} has no training examples")
    world.broadcast_module(policy.model)
    if compute_copy is not None:
        compute_copy.refresh()
    if world.sharded:
        fsdp.shard(policy.model, world, precision)
    return Setup(
        config,
        policy,
        reference,
        task,
        template,
        method,
        params,
        train_examples,
        eval_examples,
        compute_copy,
        precision.grad_scaler(policy.device),
        world=world,
    )


def make_optimizer(setup: Setup) -> torch.optim.Optimizer:
    """`optim.optimizer` (AdamW, or 8-bit AdamW) over the policy's trainable (master) weights."""
    o = setup.config.optim
    params = [p for p in setup.policy.model.parameters() if p.requires_grad]
    return optimizers.make_optimizer(o.optimizer, params, o.lr, o.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then constant / linear / cosine decay, stepped once per iteration."""
    o, total = config.optim, config.iterations

    def factor(it: int) -> float:
        if o.warmup_iters and it < o.warmup_iters:
            return (it + 1) / o.warmup_iters
        if o.schedule == "constant":
            return 1.0
        progress = (it - o.warmup_iters) / max(1, total - o.warmup_iters)
        if o.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
