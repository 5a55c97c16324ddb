"""Strategy `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trained model.

Each decoder layer and the root model are sharded over the ranks: the fp32 master weights, their
gradients and the AdamW state live sharded (1/N of them per rank), which is most of training's
memory (16 of the 18-20 bytes per parameter). Under mixed precision FSDP2's own policy gathers
the weights in the compute dtype and reduces gradients in fp32, in place of rlino's compute copy.

How rlino drives it, and why:

- sampling, evaluation and the frozen log-probs run on gathered (whole) weights (`gathered`):
  ranks sample different numbers of tokens, and gathered weights need no collective per forward
  pass, so no rank waits on a pass another rank never makes. Peak memory therefore holds one
  whole copy of the weights in the compute dtype while sampling, as verl's rollout phase does;
- the update runs FSDP2 as designed (weights gathered layer by layer, gradients reduce-scattered
  on the last micro-batch of each optimiser step); a rank with fewer micro-batches than another
  makes idle passes of zero loss (`lockstep_passes`), so every rank runs the same collectives.
  FSDP2 averages the gradients over ranks; they are multiplied back by N to be the one-process
  sum (gloo has no premultiplied sum);
- checkpoints and `final/` hold whole tensors in the one-process layout (`full_model_state`,
  `full_optimizer_state`, gathered on every rank, written by rank 0), so a run sharded over N
  ranks resumes on any number of ranks with either strategy, or in one process.

Not supported with fsdp (a clear error): LoRA, fp16 (its loss scaler is not sharded-aware here),
and `analysis.equivalence_every`. The frozen KL reference is a whole copy on each rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from rlino.errors import UserError

if TYPE_CHECKING:
    from rlino.distributed import World
    from rlino.precision import Precision


def check_supported(*, lora: bool, precision: Precision, equivalence_every: int) -> None:
    """UserError for what `fsdp` does not do (see the module docstring)."""
    if lora:
        raise UserError("dist.strategy fsdp does not support model.lora; use dist.strategy ddp")
    if precision.compute == torch.float16 and precision.mixed:
        raise UserError("dist.strategy fsdp does not support fp16; use --dtype bf16 or fp32")
    if equivalence_every:
        raise UserError("analysis.equivalence_every needs dist.strategy ddp (or one process)")


def shard(model: torch.nn.Module, world: World, precision: Precision) -> None:
    """fully_shard each decoder layer, then the root, over all ranks (one mesh dimension)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(
        param_dtype=precision.compute if precision.mixed else None, reduce_dtype=torch.float32
    )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(
            f"dist.strategy fsdp needs a decoder with model.layers; {type(model).__name__} has "
            "none (use dist.strategy ddp)"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    """Is `model` an FSDP2 root?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Whole weights for the block (one all-gather per sharded module, on every rank), kept
    through any number of forward passes, resharded at the end. A no-op for an unsharded model."""
    if not is_sharded(model):
        yield
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root
        for m in modules:
            m.reshard()


def idle_pass(model: torch.nn.Module) -> None:
    """A forward and backward of zero loss on one token: a rank with fewer micro-batches than
    another makes these, so every rank runs the same sequence of FSDP collectives."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device)).logits
    (logits.float().sum() * 0.0).backward()


def lockstep_passes(model: torch.nn.Module, world: World, passes: int) -> Iterator[bool]:
    """For `passes` local micro-batches: yield, for each of the most any rank has, whether this
    rank has a real one (False: make an `idle_pass`), with gradient sync on the last pass only;
    afterwards FSDP2's average of the reduced gradients is scaled back to the sum over ranks."""
    total = world.max(passes)
    for i in range(total):
        model.set_requires_gradient_sync(i == total - 1)
        yield i < passes
    model.set_requires_gradient_sync(True)
    if total:
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(world.size)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded DTensor (a collective), or `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole, CPU copies of the model's parameters and buffers (every rank must call it).

    A tied weight (e.g. the output head sharing the embeddings) is listed once, under its first
    name, as `save_pretrained` writes it for an unsharded model."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = full(t).detach().cpu()
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's state dict with whole tensors: the one-process layout (every rank calls)."""
    state = optimizer.state_dict()
    return {
        "state": {
            i: {k: full(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def shard_optimizer_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """A one-process (whole-tensor) optimiser state dict, its tensors sharded like the params."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out: dict[int, dict[str, Any]] = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
            else v
            for k, v in s.items()
        }
    return {"state": out, "param_groups": state["param_groups"]}
