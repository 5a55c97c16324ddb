"""Evaluation: greedy pass@1, sampled pass@k / mean@k, and completion lengths split by correctness.

Used by `rlino eval` and by the training loop's periodic evaluation, so both report the same numbers.
Lengths are in completion tokens (up to and including the stop token). Prompts are encoded by
`rlino.tasks.encode_prompts`, the function training uses, so both feed the model the same ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlino.metrics import mean_at_k, pass_at_k
from rlino.tasks import Example, Task
from rlino.tasks.templates import encode_texts

if TYPE_CHECKING:
    from rlino.policy import Policy


@dataclass
class Completion:
    """One graded completion (also the record written by `--save`)."""

    index: int
    sample: int
    prompt: str
    response: str
    length: int
    finished: bool
    correct: bool
    reward: float
    extracted: str | None
    format_ok: bool


@dataclass
class EvalReport:
    """Aggregate numbers of one evaluation."""

    n: int
    accuracy: float
    """Greedy pass@1 when samples == 1 at temperature 0; else mean@k (the mean per-sample accuracy)."""
    mean_length: float
    mean_length_correct: float | None
    mean_length_wrong: float | None
    reward_mean: float
    format_rate: float
    truncated_rate: float = 0.0
    """Fraction of completions cut at max_new_tokens (no EOS, no stop string): scored anyway."""
    pass_at: dict[int, float] = field(default_factory=dict)
    samples: int = 1
    completions: list[Completion] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON-able numbers (what `rlino eval --json` prints)."""
        out: dict[str, Any] = {
            "n": self.n,
            "accuracy": self.accuracy,
            "mean_length": self.mean_length,
            "mean_length_correct": self.mean_length_correct,
            "mean_length_wrong": self.mean_length_wrong,
            "reward_mean": self.reward_mean,
            "format_rate": self.format_rate,
            "truncated_rate": self.truncated_rate,
        }
        if self.samples > 1:
            for k, value in sorted(self.pass_at.items()):
                out[f"pass@{k}"] = value
            out[f"mean@{self.samples}"] = self.accuracy
        return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate(
    policy: Policy,
    task: Task,
    examples: Sequence[Example],
    *,
    template: str | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    seed: int = 0,
    backend: str = "builtin",
    on_batch: Callable[[int], None] | None = None,
    first_index: int = 0,
) -> EvalReport:
    """Sample `samples` completions per example and grade them.

    With samples == 1 and temperature 0 this is greedy pass@1. `on_batch(n_prompts_done)` lets a
    caller drive a progress bar. Example i samples with seed `prompt_seeds(seed, [first_index +
    i])`: the same draws whatever `batch_size`, and a data-parallel rank evaluating a shard that
    starts at `first_index` draws what one process would.
    """
    from rlino.rollout import SamplingConfig, generate, prompt_seeds

    sampling = SamplingConfig(
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        stop_strings=task.stop_strings(template),
    )
    template = template or task.default_template
    prompts = [task.prompt(ex, template, policy.tokenizer) for ex in examples]
    completions: list[Completion] = []
    for start in range(0, len(examples), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = encode_texts(policy.tokenizer, chunk, template)
        seeds = prompt_seeds(seed, range(first_index + start, first_index + start + len(chunk)))
        rollouts = generate(policy, ids, samples, sampling, seed=seeds, backend=backend)
        texts = rollouts.texts(policy.tokenizer)
        lengths = rollouts.completion_mask.sum(dim=1).tolist()
        finished = rollouts.finished.tolist()
        prompt_index = rollouts.prompt_index.tolist()
        for row, text in enumerate(texts):
            i = start + prompt_index[row]
            score = task.score(text, examples[i])
            completions.append(
                Completion(
                    index=i,
                    sample=row % samples,
                    prompt=prompts[i],
                    response=text,
                    length=int(lengths[row]),
                    finished=bool(finished[row]),
                    correct=score.correct,
                    reward=score.reward,
                    extracted=score.extracted,
                    format_ok=score.format_ok,
                )
            )
        if on_batch is not None:
            on_batch(min(start + batch_size, len(examples)))
    return summarize(completions, len(examples), samples)


def summarize(completions: Sequence[Completion], n: int, samples: int) -> EvalReport:
    """Aggregate graded completions: accuracy, pass@k for k in 1, 2, 4, ... <= samples, lengths."""
    correct_by_example = [0] * n
    for c in completions:
        correct_by_example[c.index] += int(c.correct)
    pass_at: dict[int, float] = {}
    if samples > 1:
        k = 1
        while k <= samples:
            pass_at[k] = sum(pass_at_k(samples, c, k) for c in correct_by_example) / max(n, 1)
            k *= 2
        pass_at[samples] = sum(pass_at_k(samples, c, samples) for c in correct_by_example) / max(
            n, 1
        )
    accuracy = sum(mean_at_k(samples, c) for c in correct_by_example) / max(n, 1) if n else 0.0
    lengths = [c.length for c in completions]
    return EvalReport(
        n=n,
        accuracy=accuracy,
        mean_length=_mean(lengths) or 0.0,
        mean_length_correct=_mean([c.length for c in completions if c.correct]),
        mean_length_wrong=_mean([c.length for c in completions if not c.correct]),
        reward_mean=_mean([c.reward for c in completions]) or 0.0,
        format_rate=_mean([float(c.format_ok) for c in completions]) or 0.0,
        truncated_rate=_mean([float(not c.finished) for c in completions]) or 0.0,
        pass_at=pass_at,
        samples=samples,
        completions=list(completions),
    )
