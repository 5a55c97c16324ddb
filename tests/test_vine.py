"""Monte-Carlo step credit (`vine`): step boundaries, token mapping, values, advantages, the loop.

The value estimates are checked against a sampler whose continuations succeed with a known
probability per prefix (so the exact advantages are known); step splitting runs on the real
tokenizers of the built-in tiny base and of the random test model; the sampler and a whole run go
through the real tiny models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import tiny_config

from rlino.errors import UserError
from rlino.losses import policy_loss
from rlino.method_switch import carry_params
from rlino.methods import MethodParams, ScoredBatch, get_method, weigh
from rlino.resolve import TINY_MODEL_DIR
from rlino.tasks import get_task
from rlino.tasks.base import Task, tidy_step_ends
from rlino.vine import completion_step_ends, token_step_ends

pytestmark = pytest.mark.usefixtures("one_thread")

VINE = get_method("vine")
ROOT = Path(__file__).resolve().parents[1]


def steps_of(text: str, ends: Sequence[int]) -> list[str]:
    bounds = [0, *ends, len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


# ---- step boundaries in characters ------------------------------------------------------------


def test_default_steps_are_lines_and_blank_lines_join_the_step_before() -> None:
    task = get_task("countdown")  # any task will do: the base class's rule is called
    text = "\nfirst line\n\nsecond\nthird\n  \n"
    ends = Task.step_ends(task, text)
    assert steps_of(text, ends) == ["\nfirst line\n\n", "second\n", "third\n  \n"]
    assert Task.step_ends(task, "one line, no newline") == []


def test_tidy_merges_whitespace_steps_and_drops_the_ends() -> None:
    text = "a = 1\n\nb = 2\n"
    assert tidy_step_ends(text, [5, 6, 7, 0, len(text), 99, -3]) == [7]
    assert tidy_step_ends("   x", [1, 2]) == []


def test_countdown_steps_are_the_equations_and_the_answer_is_one_step() -> None:
    task = get_task("countdown")
    tiny = " 5 * 10 = 50, 50 + 10 = 70. 3 + 4 = 7.</think> <answer> (5 * 10) + 10 = 60 </answer>"
    assert steps_of(tiny, task.step_ends(tiny)) == [
        " 5 * 10 = 50,",
        " 50 + 10 = 70.",
        " 3 + 4 = 7.",
        "</think>",
        " <answer> (5 * 10) + 10 = 60 </answer>",
    ]
    lines = "Let me try.\n3 + 4 = 7\n7 * 2 = 14\n</think>\n<answer> (3 + 4) * 2 </answer>"
    assert steps_of(lines, task.step_ends(lines)) == [
        "Let me try.\n",
        "3 + 4 = 7\n",
        "7 * 2 = 14\n",
        "</think>\n",
        "<answer> (3 + 4) * 2 </answer>",
    ]
    assert task.step_ends("<answer> 3 + 4 = 7 </answer>") == []


def test_gsm8k_steps_are_lines_up_to_the_answer() -> None:
    task = get_task("gsm8k")
    text = (
        " Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Altogether 48+24 = <<48+24=72>>72 clips.\n"
        "#### 72\n"
        "Question:"
    )
    assert steps_of(text, task.step_ends(text)) == [
        " Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n",
        "Altogether 48+24 = <<48+24=72>>72 clips.\n",
        "#### 72\nQuestion:",
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("0123456789 =+-*/.,;\n\t<>/answerthink#x")), max_size=120)
)
def test_step_ends_are_increasing_inside_and_never_blank(text: str) -> None:
    for name in ("countdown", "gsm8k"):
        ends = get_task(name).step_ends(text)
        assert all(0 < e < len(text) for e in ends)
        assert ends == sorted(set(ends))
        if ends:  # a split never makes a blank step
            assert all(step.strip() for step in steps_of(text, ends)), (name, text, ends)


# ---- step boundaries in tokens ------------------------------------------------------------------


class PieceTokenizer:
    """Token i decodes to pieces[i]; `leading_space` makes it drop a word's leading space when the
    word starts the text, as SentencePiece does (so pieces do not simply concatenate)."""

    def __init__(self, pieces: list[str], leading_space: bool = False) -> None:
        self.pieces, self.leading_space = pieces, leading_space
        self.decodes = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decodes += 1
        text = "".join(self.pieces[i] for i in ids)
        return text[1:] if self.leading_space and text.startswith(" ") else text

    def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = True):
        return [self.decode(r) for r in rows]


def test_a_token_that_straddles_a_boundary_ends_the_step_it_finishes() -> None:
    pieces = ["3 + 4 = 7", ".\n", "7 * 2 = 14", "\nThe", " answer", " is", " 14"]
    ids = list(range(len(pieces)))
    for leading_space in (False, True):  # running sums, then per-prefix decodes
        tok = PieceTokenizer(pieces, leading_space)
        text = tok.decode(ids)
        char_ends = get_task("gsm8k").step_ends(text)  # after each newline
        ends = token_step_ends(tok, ids, char_ends)
        assert ends == [2, 4], leading_space  # ".\n" closes step 1, "\nThe" closes step 2
        assert tok.decodes > (2 + len(ids) if leading_space else 2)  # per-prefix decodes or not
    steps = ["".join(pieces[a:b]) for a, b in zip([0, 2, 4], [2, 4, 7], strict=True)]
    assert steps == ["3 + 4 = 7.\n", "7 * 2 = 14\nThe", " answer is 14"]
    # two boundaries inside one token merge; one only the last token reaches is the end
    tok = PieceTokenizer(["a\nb\nc", "d\n"])
    assert token_step_ends(tok, [0, 1], [2, 4, 7]) == [1]
    tok = PieceTokenizer(["a\n", "b\nc\n", "d"])
    assert token_step_ends(tok, [0, 1, 2], [2, 4, 6]) == [1, 2]


def test_countdown_steps_on_the_tiny_base_tokenizer() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    task = get_task("countdown")
    text = " 5 * 10 = 50, 50 + 10 = 70.</think> <answer> (5 * 10) + 10 </answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ends = completion_step_ends(task, tok, ids)
    assert [tok.decode(ids[a:b]) for a, b in zip([0, *ends], [*ends, len(ids)], strict=True)] == [
        " 5 * 10 = 50, ",  # ", " is one token: the comma ends the step, the space comes with it
        "50 + 10 = 70.",
        "</think>",
        " <answer> (5 * 10) + 10 </answer>",
    ]


def test_gsm8k_steps_on_the_character_tokenizer(tiny_random_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    task = get_task("gsm8k")
    text = "She sold 48/2 = 24 clips.\nThen 48+24 = 72.\n#### 72"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ends = completion_step_ends(task, tok, ids)
    assert ends == task.step_ends(text)  # one character per token: the same offsets
    assert steps_of(text, ends) == ["She sold 48/2 = 24 clips.\n", "Then 48+24 = 72.\n", "#### 72"]


# ---- values and advantages on a sampler with known values --------------------------------------


class KnownValues:
    """Continuations of a prefix succeed (reward 1, else `fail_reward`) with probability
    value(prefix): a task whose value function is known exactly. Steps are given per sample."""

    def __init__(
        self,
        value: Callable[[tuple[int, ...]], float],
        ends: list[list[int]],
        *,
        seed: int = 0,
        exact: bool = False,
        fail_reward: float = 0.0,
    ) -> None:
        self.value, self.ends, self.exact, self.fail_reward = value, ends, exact, fail_reward
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[tuple[list[int], list[tuple[int, ...]], int]] = []

    def step_ends(self, k: int) -> list[int]:
        return self.ends[k]

    def continuation_scores(
        self, rows: Sequence[int], prefixes: Sequence[Sequence[int]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((list(rows), [tuple(p) for p in prefixes], k))
        p = torch.tensor([self.value(tuple(prefix)) for prefix in prefixes])[:, None]  # (S, 1)
        if self.exact:  # rewards whose mean over k is exactly the value
            return p.expand(-1, k).clone(), p.expand(-1, k) > 0.5
        hit = torch.rand(len(rows), k, generator=self.generator) < p  # (S, k)
        return torch.where(hit, 1.0, self.fail_reward), hit

    def continuation_rewards(self, rows, prefixes, k) -> torch.Tensor:
        return self.continuation_scores(rows, prefixes, k)[0]


GOOD, BAD, NEUTRAL = 1, 2, 3


def true_value(prefix: tuple[int, ...]) -> float:
    """Success chance after a prefix: each GOOD token +0.2, each BAD one -0.2, from 0.5."""
    return min(1.0, max(0.0, 0.5 + 0.2 * prefix.count(GOOD) - 0.2 * prefix.count(BAD)))


def batch_of(completions: list[list[int]], rewards: list[float], group: int) -> ScoredBatch:
    width = max(len(c) for c in completions) + 1  # one padding column at least
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    mask = torch.zeros(len(completions), width, dtype=torch.bool)
    for k, c in enumerate(completions):
        ids[k, : len(c)] = torch.tensor(c)
        mask[k, : len(c)] = True
    r = torch.tensor(rewards).view(-1, group)
    return ScoredBatch(rewards=r, correct=r > 0.5, completion_ids=ids, completion_mask=mask)


# two prompts x two samples; steps of two tokens each
COMPLETIONS = [
    [GOOD, NEUTRAL, GOOD, NEUTRAL, NEUTRAL],  # up, up, then the outcome
    [GOOD, NEUTRAL, BAD, NEUTRAL],  # up, down (shares its first step with sample 0)
    [BAD, NEUTRAL, BAD, BAD],
    [NEUTRAL, NEUTRAL],  # one step
]
ENDS = [[2, 4], [2], [2], []]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def exact_advantages(completion: list[int], ends: list[int], reward: float) -> list[float]:
    """Per-token V(after step) - V(before step), the last 'after' being the reward."""
    bounds = [0, *ends, len(completion)]
    values = [true_value(tuple(completion[:e])) for e in bounds[:-1]] + [reward]
    return [
        values[t + 1] - values[t]
        for t in range(len(bounds) - 1)
        for _ in range(bounds[t + 1] - bounds[t])
    ]


def test_mc_advantages_converge_to_the_exact_ones_with_the_right_signs() -> None:
    batch = batch_of(COMPLETIONS, REWARDS, group=2)
    errors = {}
    for k in (16, 20_000):
        sampler = KnownValues(true_value, ENDS, seed=k)
        weights = weigh(VINE, MethodParams(name="vine", mc_samples=k), batch, sampler)
        assert weights.shape == batch.completion_ids.shape
        assert len(sampler.calls) == 1  # every state of the batch in one call
        rows, prefixes, draws = sampler.calls[0]
        assert draws == k
        # states: one prompt value per group, and each distinct (group, prefix) once
        assert sorted(zip(rows, prefixes, strict=True)) == [
            (0, ()),
            (0, (GOOD, NEUTRAL)),
            (0, (GOOD, NEUTRAL, GOOD, NEUTRAL)),
            (2, ()),
            (2, (BAD, NEUTRAL)),
        ]
        diffs = []
        for row, (c, e, r) in enumerate(zip(COMPLETIONS, ENDS, REWARDS, strict=True)):
            exact = torch.tensor(exact_advantages(c, e, r))
            assert bool((weights[row, len(c) :] == 0).all())  # padding carries nothing
            diffs.append((weights[row, : len(c)] - exact).abs().max())
        errors[k] = float(torch.stack(diffs).max())
    assert errors[20_000] < 0.02  # two means of 20k draws: std of the difference <= 0.005
    assert errors[20_000] < errors[16]
    w = weigh(
        VINE, MethodParams(name="vine", mc_samples=20_000), batch, KnownValues(true_value, ENDS)
    )
    assert float(w[0, 0]) > 0.1 and float(w[0, 2]) > 0.1  # GOOD steps: credit
    assert float(w[1, 2]) < -0.1  # BAD step: blame, although sample 1 shares sample 0's start
    assert float(w[2, 0]) < -0.1


def test_one_step_per_completion_is_reinforce_with_the_prompt_value_as_baseline() -> None:
    batch = batch_of(COMPLETIONS, REWARDS, group=2)
    ends = [[], [], [], []]
    sampler = KnownValues(true_value, ends, exact=True)
    weights = weigh(VINE, MethodParams(name="vine", mc_samples=3), batch, sampler)
    baseline = true_value(())  # V(prompt) = 0.5 for both prompts
    for row, c in enumerate(COMPLETIONS):
        assert torch.allclose(
            weights[row, : len(c)], torch.full((len(c),), REWARDS[row] - baseline)
        )
    # and its clipped loss at ratio 1 has REINFORCE's gradient: (R - V) grad log pi(o)
    mask = batch.completion_mask
    logp = torch.randn(mask.shape, dtype=torch.float64).requires_grad_()
    params = MethodParams(name="vine")
    loss, _ = policy_loss(VINE, params, logp, mask, weights.double(), old_logp=logp.detach())
    (grad,) = torch.autograd.grad(loss, logp)
    lengths = mask.sum(dim=1, keepdim=True)
    advantage = (torch.tensor(REWARDS) - baseline).double()[:, None]
    expected = -advantage * mask / lengths / mask.shape[0]  # seq-mean of -A log pi
    assert torch.allclose(grad, expected)


def test_values_compare_binary_success_with_weight_on_correct() -> None:
    batch = batch_of([[NEUTRAL, NEUTRAL]], [1.0], group=1)
    shaped = KnownValues(lambda p: 0.0, [[]], exact=False, fail_reward=0.1)  # never right
    on_reward = weigh(VINE, MethodParams(name="vine", mc_samples=8), batch, shaped)
    on_correct = weigh(
        VINE, MethodParams(name="vine", mc_samples=8, weight_on="correct"), batch, shaped
    )
    assert torch.allclose(on_reward[0, :2], torch.tensor([0.9, 0.9]))  # 1 - mean(0.1)
    assert torch.allclose(on_correct[0, :2], torch.tensor([1.0, 1.0]))  # 1 - mean(0)


def test_vine_needs_a_sampler_and_sane_params() -> None:
    batch = batch_of(COMPLETIONS, REWARDS, group=2)
    with pytest.raises(ValueError, match="sampler"):
        weigh(VINE, MethodParams(name="vine"), batch)
    with pytest.raises(ValueError, match="must increase"):
        weigh(VINE, MethodParams(name="vine"), batch, KnownValues(true_value, [[2, 2], [], [], []]))
    with pytest.raises(UserError, match="mc_samples must be >= 1"):
        MethodParams(name="vine", mc_samples=0).validate(group_size=4)
    MethodParams(name="vine", beta=0.01).validate(group_size=1)  # no group needed; KL allowed
    carried, notes = carry_params({"mc_samples": 8, "beta": 0.01}, "grpo", who="run x")
    assert "mc_samples" not in carried and "vine only" in notes["mc_samples"]
    assert carry_params({"mc_samples": 8}, "vine", who="run x")[0]["mc_samples"] == 8


# ---- the real sampler, the loop and the analysis --------------------------------------------------


def test_continuations_get_the_rest_of_the_token_budget(tiny_random_model_dir: Path) -> None:
    from rlino.setup import build
    from rlino.step import ContinuationSampler, rollout

    cfg = tiny_config(tiny_random_model_dir, "vine", rollout={"max_new_tokens": 12})
    setup = build(cfg)
    scored = rollout(setup, 0)
    long = max(range(scored.rewards.numel()), key=lambda k: len(scored.completion(k)))
    full = list(scored.completion(long))
    assert len(full) >= 2
    filler = [full[0]] * 11  # a prefix one token short of the cap (12)
    sampler = ContinuationSampler(setup, scored, seed=3)
    prefixes = [[], full[:2], filler]
    rewards, correct = sampler.continuation_scores([long] * 3, prefixes, k=5)
    assert rewards.shape == correct.shape == (3, 5)
    assert 0 < sampler.sampled_tokens <= 5 * (12 + 10 + 1)
    assert sampler.calls == 1 and sampler.seconds > 0
    one = ContinuationSampler(setup, scored, seed=3)
    one.continuation_scores([long], [filler], k=4)
    assert one.sampled_tokens == 4  # one token each: all that is left of the budget
    # zero_reward: a continuation cut at its budget scores 0 and wrong
    cut = tiny_config(
        tiny_random_model_dir,
        "vine",
        rollout={"max_new_tokens": 12, "on_truncation": "zero_reward"},
    )
    setup.config = cut
    strict = ContinuationSampler(setup, scored, seed=3)
    assert strict.zero_truncated
    r, c = strict.continuation_scores([long], [filler], k=6)
    keep = ContinuationSampler(setup, scored, seed=3, zero_truncated=False)
    r_keep, c_keep = keep.continuation_scores([long], [filler], k=6)
    assert bool((r <= r_keep).all()) and bool((c <= c_keep).all())
    again = ContinuationSampler(setup, scored, seed=3).continuation_scores([long], [filler], k=6)
    assert torch.equal(again[0], r)  # seeded: the same draws


def test_a_vine_step_logs_its_monte_carlo_cost(tiny_random_model_dir: Path) -> None:
    from rlino.setup import build, make_optimizer
    from rlino.step import step

    setup = build(tiny_config(tiny_random_model_dir, "vine", method={"mc_samples": 2}))
    result = step(setup, 0, make_optimizer(setup))
    row = result.metrics
    assert result.weights.shape == result.scored.completion_ids.shape
    assert row["train/mc_tokens"] >= 2 * setup.config.rollout.prompts_per_iter  # V(prompt) at least
    assert 0 < row["time/mc_s"] <= row["time/update_s"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlino", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


SMALL = [
    "--iterations", "2", "--set", "rollout.prompts_per_iter=4", "--set", "rollout.samples_per_prompt=4",
    "--set", "eval.num_examples=8", "--set", "eval.every=0", "--set", "tensorboard=false",
    "--set", "threads=1",
]  # fmt: skip


@pytest.mark.slow
def test_rlino_train_vine_on_the_tiny_countdown_base(tmp_path: Path) -> None:
    out = _cli(["train", "--method", "vine", "--out", str(tmp_path / "run"), *SMALL], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = _metrics(tmp_path / "run")
    train_rows = [r for r in rows if "train/reward_mean" in r]
    assert len(train_rows) == 2
    assert all(r["train/mc_tokens"] > 0 and r["time/mc_s"] > 0 for r in train_rows)
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.slow
def test_rlino_train_vine_on_gsm8k(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--model", str(tiny_random_model_dir), "--task", "gsm8k", "--method", "vine"]
    extra = ["--set", "rollout.max_new_tokens=24", "--out", str(tmp_path / "run")]
    out = _cli([*args, *SMALL, *extra], tmp_path)
    assert out.returncode == 0, out.stderr
    train_rows = [r for r in _metrics(tmp_path / "run") if "train/reward_mean" in r]
    assert len(train_rows) == 2 and all(r["train/mc_tokens"] > 0 for r in train_rows)


def test_equivalence_has_vine_rows(tiny_random_model_dir: Path) -> None:
    from test_equivalence import ContainsE  # noqa: F401  (registers analysis-contains-e)

    from rlino.analysis.equivalence import gradient_equivalence
    from rlino.policy import load_policy

    policy = load_policy(str(tiny_random_model_dir), device="cpu", dtype="fp32")
    kw = dict(prompts=2, samples=4, seed=0, max_new_tokens=12, inner_steps=1, mc_samples=2)
    result = gradient_equivalence(policy, get_task("analysis-contains-e"), **kw)
    labels = [row["label"] for row in result["rows"]]
    assert labels[-3:] == ["vine", "vine vs fisft+-", "vine, new draws"]
    vine, vs_fisft, redraw = result["rows"][-3:]
    assert vine["norm"] == vs_fisft["norm"] > 0  # one gradient, compared twice
    assert redraw["norm"] != vine["norm"]  # fresh continuations: another estimate
    assert redraw["ref_norm"] == vine["norm"]  # ... compared with the first one
    assert -1 <= result["grpo_vs_vine_cosine"] < 0.9999  # step credit is not GRPO's weighting
    assert -1 <= result["vine_vs_fisft_pm_cosine"] <= 1
    assert result["mc_tokens"] > 0
    again = gradient_equivalence(policy, get_task("analysis-contains-e"), **kw)
    assert again["grpo_vs_vine_cosine"] == result["grpo_vs_vine_cosine"]


# ---- accuracy against sampled tokens --------------------------------------------------------------


def _fake_run(out: Path, label: str, seed: int, rows: list[dict]) -> None:
    run = out / "runs" / label / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_budget_puts_runs_of_several_grids_on_one_token_axis(tmp_path: Path) -> None:
    from rlino.analysis.budget import budget_table, load_runs, main, render_table

    def rows(its: int, tokens: int, mc: int, acc: list[float]) -> list[dict]:
        out = [{"iteration": 0, "eval/accuracy": acc[0]}]
        for i in range(1, its + 1):
            row: dict = {"iteration": i, "train/sampled_tokens": tokens}
            if mc:
                row["train/mc_tokens"] = mc
            if i % 2 == 0:
                row["eval/accuracy"] = acc[i // 2]
            out.append(row)
        return out

    for seed in (0, 1):  # vine: 2 iterations of 100 + 900 tokens; grpo: 100 per iteration
        _fake_run(tmp_path / "a", "vine", seed, rows(2, 100, 900, [0.2, 0.5]))
        _fake_run(tmp_path / "a", "grpo", seed, rows(2, 100, 0, [0.2, 0.3]))
        _fake_run(
            tmp_path / "b",
            "grpo",
            seed,
            rows(20, 100, 0, [0.2, *[0.3 + 0.02 * i for i in range(10)]]),
        )
    runs = load_runs([tmp_path / "a", tmp_path / "b"])
    assert {label for label, _ in runs} == {"vine", "grpo (a)", "grpo (b)"}
    assert runs[("vine", 0)][-1]["budget/tokens"] == 2000
    summary = budget_table(runs)
    assert summary["budget_tokens"] == 2000  # vine's whole run
    by = {r["label"]: r for r in summary["rows"]}
    assert by["vine"]["mc_share"] == pytest.approx(0.9)
    assert by["vine"]["accuracy_at_budget"] == pytest.approx(0.5)
    assert by["grpo (b)"]["tokens_at_budget"] == 2000  # 20 iterations of 100 tokens
    assert by["grpo (b)"]["accuracy_at_budget"] == pytest.approx(0.3 + 0.02 * 9)
    assert by["grpo (a)"]["accuracy_at_budget"] == pytest.approx(0.3)  # its whole run is cheaper
    assert "| vine | 2 | 2 | 0.00 | 90% | 50.0 ± 0.0 | 50.0 |" in render_table(summary)
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--budget", "1000"]) == 0
    saved = json.loads((tmp_path / "a" / "budget.json").read_text())
    assert saved["budget_tokens"] == 1000 and (tmp_path / "a" / "budget.png").stat().st_size > 0
    assert main([str(tmp_path / "missing")]) == 2
