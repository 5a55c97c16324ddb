"""The single training loop: sample -> verify -> weigh -> update -> evaluate -> checkpoint.

Every method runs through this loop unchanged. A method only decides how a scored group of samples
becomes per-sample weights (`Method.advantages`) and which surrogate turns weights into a loss
(`losses.policy_loss`): GRPO's clipped ratio with optional KL, or F-ISFT's plain weighted
log-likelihood. That is the paper's point made structural: GRPO here *is* filtered iterative SFT
with particular weights, plus a ratio that stays at 1 on the first pass.

Simplifications, stated: one process, one device; prompts are drawn in a seeded order that is a
pure function of the iteration number, and sampling seeds are too, so a resumed run repeats the
uninterrupted one exactly (on CPU); the learning-rate schedule advances once per iteration.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlino import checkpoint
from rlino.config import TrainConfig, save_config
from rlino.errors import UserError
from rlino.evaluate import EvalReport, evaluate
from rlino.losses import micro_batch_share, policy_loss
from rlino.methods import Method, MethodParams, resolve
from rlino.policy import (
    Policy,
    load_policy,
    resolve_device,
    resolve_dtype,
    save_policy,
    set_activation_checkpointing,
    token_logprobs_and_entropy,
)
from rlino.precision import ComputeCopy, resolve_precision
from rlino.rollout import Rollouts, SamplingConfig, generate
from rlino.runlog import MetricsLog
from rlino.tasks import Example, Task, get_task, get_template, task_names

# ---------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything a run needs, built once from the config."""

    config: TrainConfig
    policy: Policy
    """the trained model, its weights in the master dtype"""
    reference: Policy | None
    task: Task
    template: str
    method: Method
    params: MethodParams
    train_examples: list[Example]
    eval_examples: list[Example]
    compute_copy: ComputeCopy | None = None
    """the policy in the compute dtype, under mixed precision (None: `policy` computes itself)"""
    scaler: torch.amp.GradScaler = dataclasses.field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )
    """fp16 loss scaling (see rlino.precision); disabled otherwise"""

    @property
    def compute_policy(self) -> Policy:
        """The model that does the arithmetic: sampling, evaluation, the update's passes."""
        return self.policy if self.compute_copy is None else self.compute_copy.policy


def resolve_model_and_task(
    config: TrainConfig,
) -> tuple[str, str | None, dict[str, Any], str | None]:
    """(model path, gguf file, task options, template) with the tiny model's recorded task settings filled in.

    No model on the Countdown task means the built-in tiny base; a model dir that records the task
    it was pretrained for (`rlino_task.json`) supplies the task options the user did not set.
    """
    from rlino import tiny

    if config.task.name not in task_names():
        raise UserError(f"unknown task {config.task.name!r}; known: {', '.join(task_names())}")
    path = config.model.path
    if path is None:
        if config.task.name != "countdown":
            raise UserError(f"task {config.task.name!r} needs a model: pass --model DIR|ID")
        path = str(tiny.default_model_dir())
    options = dict(config.task.options)
    template = config.task.template
    recorded = tiny.task_settings(Path(path)) if Path(path).is_dir() else None
    if recorded and recorded.get("task") == config.task.name:
        options = {**recorded.get("options", {}), **options}
        template = template or recorded.get("template")
    return path, config.model.gguf_file, options, template


def build(config: TrainConfig, weights: Path | None = None) -> Setup:
    """Load the policy (and the frozen reference when beta > 0), the task and its data.

    `weights` (a checkpoint's model dir) replaces the policy's starting weights; the reference
    always comes from the base model.
    """
    path, gguf_file, options, template = resolve_model_and_task(config)
    task = get_task(config.task.name, **options)
    template = template or task.default_template
    get_template(template)
    method, params = resolve(config.method)
    if params.aggregation == "constant" and params.constant_length is None:
        params = dataclasses.replace(params, constant_length=config.rollout.max_new_tokens)
    precision = resolve_precision(
        resolve_dtype(config.model.dtype, resolve_device(config.model.device)),
        config.model.master_dtype,
    )
    master_dtype = str(precision.master).removeprefix("torch.")  # "float32" etc.
    if weights is not None:
        policy = load_policy(str(weights), device=config.model.device, dtype=master_dtype)
    else:
        policy = load_policy(
            path, gguf_file=gguf_file, device=config.model.device, dtype=master_dtype
        )
    compute_copy = ComputeCopy(policy, precision.compute) if precision.mixed else None
    if config.optim.gradient_checkpointing:
        # Only active in train mode (the update); sampling and evaluation run in eval mode.
        compute_model = policy.model if compute_copy is None else compute_copy.policy.model
        set_activation_checkpointing(compute_model, True)
    reference = None
    if method.uses_kl and params.beta > 0:
        reference = load_policy(
            path, gguf_file=gguf_file, device=config.model.device, dtype=config.model.dtype
        )
        reference.model.eval().requires_grad_(False)
    train_examples = task.examples("train")
    eval_examples = task.examples("test")[: config.eval.num_examples]
    if not train_examples:
        raise UserError(f"task {config.task.name!r} has no training examples")
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
    )


def prompt_order(n_examples: int, seed: int, iteration: int, per_iter: int) -> list[int]:
    """Indices of the training prompts of `iteration`: a fresh seeded permutation each epoch."""
    out = []
    for k in range(iteration * per_iter, (iteration + 1) * per_iter):
        epoch, pos = divmod(k, n_examples)
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        out.append(int(torch.randperm(n_examples, generator=g)[pos]))
    return out


def sampling_seed(seed: int, iteration: int) -> int:
    """The sampling seed of an iteration: a pure function, so resume repeats the same draws."""
    return (seed * 1_000_003 + iteration * 7_919 + 17) % (2**31)


# ---------------------------------------------------------------- one iteration


@dataclass
class Scored:
    """A rollout batch with its verdicts."""

    rollouts: Rollouts
    texts: list[str]
    rewards: torch.Tensor  # (P, G)
    correct: torch.Tensor  # (P, G) bool
    format_ok: torch.Tensor  # (P, G) bool
    lengths: torch.Tensor  # (P, G)


def sample_and_score(setup: Setup, iteration: int) -> tuple[Scored, list[Example]]:
    """Draw G samples for each of this iteration's P prompts and verify them."""
    cfg = setup.config
    p, g = cfg.rollout.prompts_per_iter, cfg.rollout.samples_per_prompt
    idx = prompt_order(len(setup.train_examples), cfg.seed, iteration, p)
    examples = [setup.train_examples[i] for i in idx]
    sampler = setup.compute_policy
    prompt_ids = encode_prompts(sampler, setup.task, examples, setup.template)
    sampling = SamplingConfig(
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        max_new_tokens=cfg.rollout.max_new_tokens,
        stop_strings=setup.task.stop_strings(setup.template),
    )
    sampler.model.eval()
    rollouts = generate(
        sampler,
        prompt_ids,
        g,
        sampling,
        seed=sampling_seed(cfg.seed, iteration),
        backend=cfg.rollout.backend,
    )
    texts = rollouts.texts(sampler.tokenizer)
    scores = [
        setup.task.score(text, examples[int(i)])
        for text, i in zip(texts, rollouts.prompt_index, strict=True)
    ]
    scored = Scored(
        rollouts=rollouts,
        texts=texts,
        rewards=torch.tensor([s.reward for s in scores], dtype=torch.float32).view(p, g),
        correct=torch.tensor([s.correct for s in scores]).view(p, g),
        format_ok=torch.tensor([s.format_ok for s in scores]).view(p, g),
        lengths=rollouts.completion_mask.sum(dim=1).view(p, g),
    )
    return scored, examples


def encode_prompts(
    policy: Policy, task: Task, examples: list[Example], template: str
) -> list[list[int]]:
    """Prompt token ids; chat templates already contain their special tokens."""
    add_special = not get_template(template).chat
    texts = [task.prompt(ex, template, policy.tokenizer) for ex in examples]
    return [policy.tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]


def _micro_slices(rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _token_slices(
    rows: torch.Tensor, attn: torch.Tensor, start: int, max_rows: int, max_tokens: int
) -> Iterator[torch.Tensor]:
    """Consecutive slices of `rows` of at most `max_rows` rows whose padded size fits `max_tokens`.

    A slice's padded size is what `_batch_logprobs` runs: rows x (longest prompt + longest
    completion among them). A single row always forms a slice, however long. `max_tokens` 0 = no cap.
    Why a token budget: activation memory grows with tokens, not samples; with 128-token completions
    a 135M model keeps about 1.7 MB per token (fp32), so 32 samples at once need ~9 GB.
    """
    prompt_lens = attn[rows, :start].sum(dim=1).tolist()
    completion_lens = attn[rows, start:].sum(dim=1).tolist()
    first, prompt_max, completion_max = 0, 0, 0
    for i, (prompt_len, completion_len) in enumerate(
        zip(prompt_lens, completion_lens, strict=True)
    ):
        count = i - first + 1
        width = max(prompt_max, prompt_len) + max(completion_max, completion_len)
        if count > 1 and (count > max_rows or (max_tokens and count * width > max_tokens)):
            yield rows[first:i]
            first, prompt_max, completion_max = i, 0, 0
        prompt_max, completion_max = (
            max(prompt_max, prompt_len),
            max(completion_max, completion_len),
        )
    if prompt_lens:
        yield rows[first:]


def _batch_logprobs(
    model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, start: int, rows: torch.Tensor
) -> torch.Tensor:
    """Completion log-probs of `rows`, with the padding columns that all rows share cut off."""
    left = int(attn[rows, :start].any(dim=0).long().argmax())  # first prompt column in use
    right = start + int(attn[rows, start:].sum(dim=1).max())  # last completion column in use
    logp, _ = token_logprobs_and_entropy(
        model, ids[rows, left:right], attn[rows, left:right], start - left, with_entropy=False
    )
    return logp  # (n, right - start)


def _optimizer_step(setup: Setup, optimizer: torch.optim.Optimizer) -> float | None:
    """Unscale, clip and step the master weights, then refresh the compute copy.

    Returns the gradient norm before clipping, or None when fp16 loss scaling skipped the step
    because the gradients overflowed.
    """
    scaler = setup.scaler
    scaler.unscale_(optimizer)
    clip = setup.config.optim.grad_clip if setup.config.optim.grad_clip > 0 else math.inf
    norm = float(torch.nn.utils.clip_grad_norm_(setup.policy.model.parameters(), clip))
    scale = scaler.get_scale()
    scaler.step(optimizer)  # a no-op if the gradients overflowed
    scaler.update()
    if setup.compute_copy is not None:
        setup.compute_copy.refresh()
    return None if scaler.is_enabled() and scaler.get_scale() < scale else norm


def update(
    setup: Setup, scored: Scored, advantages: torch.Tensor, optimizer: torch.optim.Optimizer
) -> dict[str, float]:
    """mu passes of minibatched, gradient-accumulated updates on one rollout batch.

    Under mixed precision the compute copy runs every pass: its gradients are added into the fp32
    master's after each micro-batch, and it takes the new master weights after each optimizer step.

    Samples whose weight is exactly 0 (filtered groups) add nothing to the policy gradient, so they
    are not run through the model unless a KL term needs them; they still count in the loss's
    normaliser, so the result equals the naive computation over every sample.
    """
    cfg, params, method = setup.config, setup.params, setup.method
    model = setup.compute_policy.model  # runs every pass: the policy, or its compute-dtype copy
    compute_copy = setup.compute_copy
    device = setup.policy.device
    scaler = setup.scaler
    r = scored.rollouts
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1).to(device)  # (N, Lp + Lc)
    attn = torch.cat([r.prompt_mask, r.completion_mask], dim=1).to(device)  # (N, Lp + Lc)
    mask_full = r.completion_mask.to(device)  # (N, Lc)
    start = r.prompt_ids.shape[1]
    adv = advantages.reshape(-1).to(device)  # (N,)
    n = adv.shape[0]
    needs_kl = setup.reference is not None
    needs_old = method.surrogate == "clipped" and (params.mu > 1 or cfg.optim.minibatch_size < n)
    all_rows = torch.arange(n, device=device)

    def micro_slices(rows: torch.Tensor) -> Iterator[torch.Tensor]:
        optim = cfg.optim
        return _token_slices(rows, attn, start, optim.micro_batch_size, optim.micro_batch_tokens)

    def frozen_logp(m: torch.nn.Module) -> torch.Tensor:
        out = torch.zeros(mask_full.shape, device=device)
        with torch.no_grad():
            for rows in micro_slices(all_rows):
                logp = _batch_logprobs(m, ids, attn, start, rows)
                out[rows, : logp.shape[1]] = logp.float()
        return out

    model.eval()
    old_logp = frozen_logp(model) if needs_old else None
    ref_logp = frozen_logp(setup.reference.model) if needs_kl else None
    model.train()

    loss_total, stat_weight = 0.0, 0.0
    stat_totals: dict[str, float] = {}
    steps = skipped = 0
    grad_norms = []
    for _ in range(params.mu):
        for mb in _micro_slices(all_rows, cfg.optim.minibatch_size):
            optimizer.zero_grad(set_to_none=False)
            active = mb if needs_kl else mb[adv[mb] != 0]
            for rows in micro_slices(active):
                logp = _batch_logprobs(model, ids, attn, start, rows)
                width = logp.shape[1]
                mask = mask_full[rows, :width]
                loss, stats = policy_loss(
                    method,
                    params,
                    logp.float(),
                    mask,
                    adv[rows],
                    old_logp=None if old_logp is None else old_logp[rows, :width],
                    ref_logp=None if ref_logp is None else ref_logp[rows, :width],
                )
                share = micro_batch_share(mask_full[rows], mask_full[mb], params.aggregation)
                scaler.scale(loss * share).backward()
                if compute_copy is not None:
                    compute_copy.accumulate_grads()
                for key, value in stats.items():
                    stat_totals[key] = stat_totals.get(key, 0.0) + float(value) * share
                stat_weight += share
                loss_total += float(loss.detach()) * share
            norm = _optimizer_step(setup, optimizer)
            if norm is None:
                skipped += 1
            else:
                grad_norms.append(norm)
            steps += 1
    # The loss is the minibatch loss (skipped rows add 0 to it); the other statistics (ratio,
    # clipping, KL) are means over the rows that were actually run through the model.
    out = {key: value / stat_weight for key, value in stat_totals.items()}
    out["loss"] = loss_total / steps
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else None
    out["optimizer_steps"] = steps
    if scaler.is_enabled():
        out["optim/skipped_steps"] = skipped  # overflowed fp16 gradients
        out["optim/loss_scale"] = scaler.get_scale()
    return out


def _mean_where(values: torch.Tensor, where: torch.Tensor) -> float | None:
    return float(values[where].float().mean()) if bool(where.any()) else None


def train_metrics(scored: Scored, advantages: torch.Tensor) -> dict[str, Any]:
    """Per-iteration statistics of the rollout batch: rewards, filtering, lengths, weight balance."""
    from rlino.losses import group_weight_sums

    c, lengths = scored.correct, scored.lengths
    filtered = (scored.rewards == scored.rewards[:, :1]).all(dim=1)
    sums = group_weight_sums(advantages)
    r = scored.rollouts
    entropy = None  # Monte-Carlo estimate: -mean log-prob of the sampled tokens (sampling policy)
    if r.logprobs is not None:
        entropy = float(
            -(r.logprobs * r.completion_mask).sum() / r.completion_mask.sum().clamp(min=1)
        )
    return {
        "train/reward_mean": float(scored.rewards.mean()),
        "train/accuracy": float(c.float().mean()),
        "train/format_rate": float(scored.format_ok.float().mean()),
        "train/groups_filtered": float(filtered.float().mean()),
        "train/length_mean": float(lengths.float().mean()),
        "train/length_correct": _mean_where(lengths, c),
        "train/length_wrong": _mean_where(lengths, ~c),
        "train/weight_sum_mean": float(sums.mean()),
        "train/weight_sum_min": float(sums.min()),
        "train/truncated": float((~r.finished).float().mean()),
        "entropy": entropy,
    }


def eval_metrics(report: EvalReport) -> dict[str, Any]:
    """The namespaced numbers of a periodic evaluation."""
    return {
        "eval/accuracy": report.accuracy,
        "eval/reward_mean": report.reward_mean,
        "eval/length_mean": report.mean_length,
        "eval/length_correct": report.mean_length_correct,
        "eval/length_wrong": report.mean_length_wrong,
        "eval/format_rate": report.format_rate,
    }


def run_eval(setup: Setup) -> EvalReport:
    """Greedy pass@1 on the fixed test subset."""
    cfg = setup.config
    setup.compute_policy.model.eval()
    return evaluate(
        setup.compute_policy,
        setup.task,
        setup.eval_examples,
        template=setup.template,
        temperature=0.0,
        max_new_tokens=cfg.rollout.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        backend=cfg.rollout.backend,
    )


# ---------------------------------------------------------------- the loop


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


class GracefulStop:
    """First Ctrl-C: finish the current iteration, checkpoint, exit. Second: abort at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


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


def train(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_iteration: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run (or resume) training into `run_dir`. `stop_after` ends this invocation early, as Ctrl-C would."""
    config.validate()
    ckpt = checkpoint.latest(run_dir) if resume else None
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    setup = build(config, weights=ckpt / "model" if ckpt is not None else None)
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the model and task loaded
    save_config(config, run_dir / "config.yaml")
    model = setup.policy.model
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
    )
    scheduler = make_scheduler(optimizer, config)
    start_iter = (
        checkpoint.load_state(ckpt, optimizer, scheduler, setup.scaler) if ckpt is not None else 0
    )
    log = MetricsLog(
        run_dir, tensorboard=config.tensorboard, resume_from=start_iter if resume else None
    )

    def save_checkpoint(iteration: int) -> None:
        checkpoint.save(
            run_dir,
            iteration,
            lambda path: save_policy(setup.policy, path),
            optimizer,
            scheduler,
            scaler=setup.scaler,
        )

    start_eval = end_eval = None
    if start_iter == 0:
        report = run_eval(setup)
        start_eval = eval_metrics(report)
        log.log({"iteration": 0, **start_eval})
    stopper = GracefulStop()
    iteration = start_iter
    sampled_tokens = 0
    with stopper.installed(), _progress(progress, config.iterations, start_iter) as bar:
        while iteration < config.iterations:
            t0 = time.perf_counter()
            scored, examples = sample_and_score(setup, iteration)
            t1 = time.perf_counter()
            p, g = scored.rewards.shape
            completions = None
            if setup.params.dedup:
                r = scored.rollouts
                completions = [
                    tuple(r.completion_ids[i][r.completion_mask[i]].tolist()) for i in range(p * g)
                ]
            advantages = setup.method.advantages(
                scored.rewards, scored.correct, setup.params, completions
            )
            stats = update(setup, scored, advantages, optimizer)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            t2 = time.perf_counter()
            iteration += 1
            tokens = int(scored.lengths.sum())
            sampled_tokens += tokens
            row: dict[str, Any] = {
                "iteration": iteration,
                **train_metrics(scored, advantages),
                **{k: v for k, v in stats.items()},
                "lr": lr,
                "time/rollout_s": t1 - t0,
                "time/update_s": t2 - t1,
                "tokens_per_s": tokens / max(t2 - t0, 1e-9),
                "tokens/sampled": tokens,
            }
            every = config.eval.every
            if iteration == config.iterations or (every and iteration % every == 0):
                report = run_eval(setup)
                row.update(eval_metrics(report))
                if iteration == config.iterations:
                    end_eval = eval_metrics(report)
            log.log(row)
            if config.samples_every and iteration % config.samples_every == 0:
                log.log_samples(sample_rows(iteration, scored, examples, advantages, setup))
            stop_now = stopper.requested or (
                stop_after is not None and iteration - start_iter >= stop_after
            )
            if (
                iteration == config.iterations
                or stop_now
                or (config.checkpoint_every and iteration % config.checkpoint_every == 0)
            ):
                save_checkpoint(iteration)
            if on_iteration is not None:
                on_iteration(iteration, row)
            bar.advance(row)
            if stop_now:
                break
    completed = iteration >= config.iterations
    if completed:
        final = run_dir / "final"
        tmp = run_dir / ".tmp-final"
        save_policy(setup.policy, tmp)
        if final.exists():
            import shutil

            shutil.rmtree(final)
        tmp.replace(final)
    log.close()
    return TrainResult(run_dir, iteration, completed, stopper.requested, start_eval, end_eval)


def sample_rows(
    iteration: int,
    scored: Scored,
    examples: list[Example],
    advantages: torch.Tensor,
    setup: Setup,
    groups: int = 2,
) -> list[dict[str, Any]]:
    """A few completions (the first `groups` groups) for samples.jsonl."""
    p, g = scored.rewards.shape
    rows = []
    for i in range(min(groups, p)):
        for j in range(g):
            k = i * g + j
            rows.append(
                {
                    "iteration": iteration,
                    "prompt": setup.task.question(examples[i]),
                    "response": scored.texts[k],
                    "reward": float(scored.rewards[i, j]),
                    "correct": bool(scored.correct[i, j]),
                    "advantage": float(advantages[i, j]),
                    "length": int(scored.lengths[i, j]),
                }
            )
    return rows


class _Bar:
    """A rich progress bar showing reward, accuracy, length and the last eval accuracy."""

    def __init__(self, progress: Any, task_id: Any):
        self.progress, self.task_id = progress, task_id
        self.eval_acc: float | None = None

    def advance(self, row: dict[str, Any]) -> None:
        if self.progress is None:
            return
        if row.get("eval/accuracy") is not None:
            self.eval_acc = row["eval/accuracy"]
        eval_text = f"{self.eval_acc:.3f}" if self.eval_acc is not None else "-"
        self.progress.update(
            self.task_id,
            advance=1,
            info=(
                f"reward {row['train/reward_mean']:.3f} acc {row['train/accuracy']:.3f} "
                f"len {row['train/length_mean']:.0f} eval {eval_text}"
            ),
        )


@contextmanager
def _progress(enabled: bool, total: int, done: int) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ) as progress:
        task_id = progress.add_task("train", total=total, completed=done, info="")
        yield _Bar(progress, task_id)
