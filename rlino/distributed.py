"""Data-parallel training on torch.distributed: who this process is, its share, and the reductions.

Under `torchrun --nproc-per-node N -m rlino train ...` every rank holds the whole model (strategy
`ddp`); each iteration's P prompts are split into N contiguous shards, all G samples of a prompt
on one rank, so group weights stay local. What makes N ranks train exactly like one process:

- sampling seeds are per prompt, a function of (seed, iteration, global prompt index), never of
  the rank or the batch (`rlino.rollout.prompt_seeds`), so each prompt draws the same completions
  wherever it runs;
- every statistic is computed from the batch gathered back in one-process order;
- loss normalisers (sample or token counts of a minibatch) are global, so each rank's loss is its
  exact share of the one-process loss, and the gradients are summed (not averaged) across ranks
  before each optimiser step: the step sees the one-process gradient.

Why gradients are all-reduced once per optimiser step rather than through DDP's backward hooks:
ranks run different numbers of micro-batches (their rows differ in length, and filtered rows are
skipped), which DDP's per-backward bucket reduction cannot match up; the sum before the step is
the same reduction DDP performs, on the master gradients, so it also covers mixed precision (the
compute copy's gradients are added into the master first) and fp16 loss scaling (an overflow on
one rank reaches every rank, and all skip the step together).

One process (no torchrun) is `World()`: every function here is then a no-op.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rlino.errors import UserError

T = TypeVar("T")

STRATEGIES = ("ddp", "fsdp")
"""`dist.strategy` values: ddp (replicated weights, gradients summed before each step) and fsdp
(FSDP2: weights, gradients and optimiser state sharded; see rlino.fsdp)."""
COLLECTIVE_TIMEOUT_MIN = 30
"""how long a rank waits in a collective for the others before failing (a hung or dead peer)"""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    size: int = 1
    strategy: str = "ddp"

    @property
    def sharded(self) -> bool:
        """FSDP2 shards the trained model (strategy fsdp under torchrun, even on one rank)."""
        return self.strategy == "fsdp" and torch.distributed.is_initialized()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, samples and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one rank: collectives are needed."""
        return self.size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (sizes differ by at most one)."""
        return shard_bounds(n, self.rank, self.size)

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order (pickled; for small per-iteration results)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum of `tensor` over ranks (returned for chaining)."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """The per-key sums over ranks of a dict of floats with the same keys on every rank."""
        if not self.active or not values:
            return values
        keys = sorted(values)
        t = self.sum_(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, t.tolist(), strict=True))

    def max(self, value: int) -> int:
        """The largest `value` over ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any."""
        if not self.active:
            return flag
        return bool(self.sum_(torch.tensor([int(flag)], dtype=torch.int64)).item())

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks, in place, in a few flat buckets.

        A parameter without a gradient on this rank (no row ran here) contributes zeros, so every
        rank enters the same collectives; afterwards every trainable parameter has a gradient,
        unless no rank had any (then, as in one process, none has one).
        """
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        if not self.any(any(p.grad is not None for p in params)):
            return
        grads = []
        for p in params:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self.sum_(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank's parameters and buffers rank 0's (a guard against divergent loads)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(t.data, src=0)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            torch.distributed.barrier()


BUCKET_BYTES = 32 * 2**20
"""gradient all-reduce bucket size: few collectives, bounded extra memory"""


def _buckets(grads: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group same-dtype, same-device gradients into buckets of about BUCKET_BYTES."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        same = out and out[-1][0].dtype == g.dtype and out[-1][0].device == g.device
        if not same or size + nbytes > BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(g)
        size += nbytes
    return out


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank`'s contiguous share of n items among `size` ranks."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise UserError(f"malformed torchrun environment (WORLD_SIZE/RANK/LOCAL_RANK): {e}") from e
    return rank, size, local


def init_world(device: str, strategy: str = "ddp") -> World:
    """Join the job torchrun started (gloo on CPU, NCCL on CUDA), or return the one-process World.

    `device` is the config's model device ("auto", "cpu", "cuda", ...): on CUDA each rank takes
    the GPU of its local rank, so "cuda" then means that GPU.
    """
    _, size, local = env_world()
    if strategy not in STRATEGIES:
        raise UserError(
            f"unknown dist.strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    # fsdp under torchrun shards even one rank (a one-rank mesh: the code path of N ranks)
    if size <= 1 and not (strategy == "fsdp" and "WORLD_SIZE" in os.environ):
        return World(strategy=strategy)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MIN),
        )
    return World(
        rank=torch.distributed.get_rank(),
        size=torch.distributed.get_world_size(),
        strategy=strategy,
    )
