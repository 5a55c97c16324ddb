"""The single training loop: sample -> verify -> weigh -> update -> evaluate -> checkpoint.

Every method runs through this loop unchanged. A method only decides how a scored batch becomes
weights (`rlino.methods.weigh`) and which surrogate turns weights into a loss
(`rlino.losses.policy_loss`): GRPO's clipped ratio with optional KL, or F-ISFT's plain weighted
log-likelihood. That is the paper's point made structural: GRPO here *is* filtered iterative SFT
with particular weights, plus a ratio that stays at 1 on the first pass.

Where the parts live: `rlino.setup` builds the policy, reference, task and optimiser once;
`rlino.step` is one iteration; `rlino.run_metrics` what is logged; `rlino.progress` the progress
bar and Ctrl-C; `rlino.checkpoint` the resumable state; `rlino.runlog` the logs, repaired on
resume after a kill; `rlino.runlock` one process per run dir.

Under torchrun (`rlino.distributed`) every rank runs this loop in lockstep on its share of the
prompts; rank 0 alone holds the run dir's lock and writes metrics, samples and checkpoints, and a
checkpoint written by N ranks resumes on any number.

Simplifications, stated: the learning-rate schedule advances once per iteration; prompt order and
sampling seeds are pure functions of (seed, iteration), so a resumed run repeats the
uninterrupted one exactly (on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlino import checkpoint, faults, fsdp
from rlino.config import TrainConfig, save_config
from rlino.distributed import World, init_world
from rlino.errors import UserError
from rlino.lora import save_checkpoint_model, save_final_model
from rlino.policy import save_policy
from rlino.progress import GracefulStop, train_bar
from rlino.run_metrics import eval_metrics, sample_rows
from rlino.runlock import RunLock
from rlino.runlog import MetricsLog
from rlino.setup import Setup, build, make_optimizer, make_scheduler
from rlino.step import greedy_eval, step


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    iterations_done: int
    completed: bool
    interrupted: bool
    """Stopped by Ctrl-C (after checkpointing)."""
    start_eval: dict[str, Any] | None
    end_eval: dict[str, Any] | None


def _due(iteration: int, every: int) -> bool:
    return bool(every) and iteration % every == 0


def train(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_iteration: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run (or resume) training into `run_dir`. `stop_after` ends this invocation early, as Ctrl-C would.

    The run dir's lock is held from before anything in it is read or written to the end, so a
    second process on the same dir stops at once (rlino.runlock).
    """
    config.validate()
    world = init_world(config.model.device, config.dist.strategy)
    with RunLock(run_dir, held=world.is_main) as lock:
        # resume: lock before reading checkpoints or logs; fresh: write nothing before the model loads
        _claim(lock, run_dir, resume, take=resume and run_dir.is_dir())
        result = _train(config, run_dir, lock, world, resume, progress, stop_after, on_iteration)
    world.barrier()  # no rank leaves (and tears the job down) before rank 0 has written final/
    return result


def _claim(lock: RunLock, run_dir: Path, resume: bool, *, take: bool = True) -> None:
    """Take the run dir's lock (or, not `take`, check that no other process has it), failing at
    once if another has; and a fresh run must not write into another run's logs."""
    if take:
        lock.acquire()
    else:
        lock.check_free()
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")


def _train(
    config: TrainConfig,
    run_dir: Path,
    lock: RunLock,
    world: World,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    on_iteration: Callable[[int, dict[str, Any]], None] | None,
) -> TrainResult:
    """The run itself, under the lock `train` holds (or takes here, for a fresh run dir)."""
    # rank 0 picks the checkpoint (verifying it once) and every rank resumes from that one
    ckpt = world.all_gather(checkpoint.latest(run_dir) if resume and world.is_main else None)[0]
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    setup = build(config, weights=ckpt / "model" if ckpt is not None else None, world=world)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)  # only once the model and task loaded
        _claim(lock, run_dir, resume)  # a fresh run locks here (a resume already did)
    optimizer = make_optimizer(setup)
    scheduler = make_scheduler(optimizer, config)
    shard = (
        (lambda state: fsdp.shard_optimizer_state(state, optimizer))
        if setup.world.sharded
        else None
    )
    start = (
        checkpoint.load_state(ckpt, optimizer, scheduler, setup.scaler, shard=shard) if ckpt else 0
    )
    if world.is_main:  # only once the checkpoint took: a refused resume leaves the run as it was
        save_config(config, run_dir / "config.yaml")
    # rows after the checkpoint (all rows, when there is none) belong to the interrupted run
    log = (
        MetricsLog(run_dir, tensorboard=config.tensorboard, resume_from=start if ckpt else None)
        if world.is_main
        else None
    )

    start_eval = end_eval = None
    if start == 0:
        start_eval = _evaluate(setup, 0)
        if log is not None:
            log.log({"iteration": 0, **start_eval})
    iteration = start
    with (
        GracefulStop().installed() as stopper,
        train_bar(progress and world.is_main, config.iterations, start) as bar,
    ):
        while iteration < config.iterations:
            result = step(setup, iteration, optimizer)
            scheduler.step()
            iteration += 1
            last = iteration == config.iterations
            row = {"iteration": iteration, **result.metrics}
            if last or _due(iteration, config.eval.every):
                evals = _evaluate(setup, iteration)
                row.update(evals)
                end_eval = evals if last else None
            if log is not None:
                log.log(row)
                if _due(iteration, config.samples_every):
                    rows = sample_rows(iteration, result.scored, result.weights, setup.task)
                    log.log_samples(rows)
            # one decision for every rank: a Ctrl-C reaches ranks at different moments
            stop_now = world.any(
                stopper.requested or (stop_after is not None and iteration - start >= stop_after)
            )
            if last or stop_now or _due(iteration, config.checkpoint_every):
                _checkpoint(run_dir, setup, iteration, optimizer, scheduler, log)
            if on_iteration is not None:
                on_iteration(iteration, row)
            bar.advance(row)
            if stop_now:
                break
    completed = iteration >= config.iterations
    weights = (
        fsdp.full_model_state(setup.policy.model) if completed and setup.world.sharded else None
    )
    if log is not None:
        if weights is not None:
            checkpoint.save_final(run_dir, lambda path: save_policy(setup.policy, path, weights))
        elif completed:
            checkpoint.save_final(run_dir, lambda path: save_final_model(setup.policy, path))
        log.close()
    return TrainResult(run_dir, iteration, completed, stopper.requested, start_eval, end_eval)


def _evaluate(setup: Setup, iteration: int) -> dict[str, Any]:
    """Greedy evaluation metrics of the policy after `iteration` iterations."""
    evals = eval_metrics(greedy_eval(setup))
    faults.point("eval", iteration)  # test hook: killed during evaluation
    return evals


def _checkpoint(
    run_dir: Path,
    setup: Setup,
    iteration: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    log: MetricsLog | None,
) -> None:
    """Checkpoint `iteration`, after the rows it covers are on disk: a kill anywhere in between
    leaves either the rows and no checkpoint (resume redoes them) or both, never a lost row.

    Every rank calls it (a sharded model is gathered whole by all); rank 0 (`log`) writes."""
    sharded = setup.world.sharded
    weights = fsdp.full_model_state(setup.policy.model) if sharded else None
    optimizer_state = fsdp.full_optimizer_state(optimizer) if sharded else optimizer
    if log is None:
        return
    log.sync()

    def save_model(path: Path) -> None:
        if weights is not None:
            save_policy(setup.policy, path, state_dict=weights)
        else:
            save_checkpoint_model(setup.policy, path)  # LoRA: the adapter alone
        faults.point("checkpoint", iteration)  # test hook: killed with the checkpoint half written

    checkpoint.save(
        run_dir,
        iteration,
        save_model,
        optimizer_state,
        scheduler,
        scaler=setup.scaler,
        keep=setup.config.checkpoint_keep,
    )
