"""Gradient equivalence: GRPO's on-policy gradient is F-ISFT's with GRPO's weights, on real rollouts.

Fast tests use the random tiny Llama with a toy user task (right when the completion contains an
"e", and sampling stops there), which gives a random model mixed verdicts and varied lengths; the slow ones use the built-in
tiny Countdown base, in-process and through the CLI with --json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_tasks import letter_task

from rlino.analysis.equivalence import draw_batch, gradient_equivalence
from rlino.errors import UserError
from rlino.tasks import Example, Score, get_task, register_task

pytestmark = pytest.mark.usefixtures("one_thread")


# Right when the completion contains an "e"; right answers stop at their first "e": lengths vary.
ContainsE = letter_task("analysis-contains-e", "e", train=32, test=32, stop_at_letter=True)


@register_task("analysis-never")
class Never(ContainsE):
    """Every completion is wrong: no group has any signal."""

    name = "analysis-never"

    def score(self, completion: str, example: Example) -> Score:
        return Score(correct=False, reward=0.0, extracted=None, format_ok=False)


@pytest.fixture(scope="module")
def random_policy(tiny_random_model_dir: Path):
    from rlino.policy import load_policy

    return load_policy(str(tiny_random_model_dir), device="cpu", dtype="fp32")


def test_grpo_equals_fisft_with_grpo_weights(random_policy) -> None:
    before = {k: v.clone() for k, v in random_policy.model.state_dict().items()}
    result = gradient_equivalence(
        random_policy,
        get_task("analysis-contains-e"),
        prompts=4,
        samples=4,
        seed=0,
        max_new_tokens=16,
        inner_steps=2,
        inner_lr=1e-2,
    )
    assert result["groups_informative"] >= 1
    assert result["length_std"] > 0
    assert result["grpo_vs_fisft_cosine"] >= 0.999
    assert result["grpo_vs_fisft_rel_diff"] < 1e-3
    assert result["grpo_vs_token_mean_cosine"] < 0.99  # lengths differ: 1/|o| matters
    assert result["grpo_vs_kl_start_cosine"] >= 0.999  # reference = policy: KL gradient 0
    assert result["k_steps_clip_frac"] > 0  # the ratio left 1 and clipping acted
    assert result["grpo_vs_k_steps_rel_diff"] > 1e-3
    labels = [row["label"] for row in result["rows"]]
    assert labels[0] == "grpo" and "fisft+" in labels and "grpo k steps + kl" in labels
    # the policy itself is untouched (the k-step model is a copy)
    after = random_policy.model.state_dict()
    assert all(bool((before[k] == after[k]).all()) for k in before)


def test_deterministic_for_a_seed(random_policy) -> None:
    task = get_task("analysis-contains-e")
    kw = dict(prompts=2, samples=4, max_new_tokens=12, inner_steps=1)
    a = gradient_equivalence(random_policy, task, seed=3, **kw)
    b = gradient_equivalence(random_policy, task, seed=3, **kw)
    assert json.dumps(a) == json.dumps(b)


def test_no_signal_is_an_error(random_policy) -> None:
    with pytest.raises(UserError, match="no learning signal"):
        draw_batch(
            random_policy,
            get_task("analysis-never"),
            "plain",
            prompts=2,
            samples=2,
            seed=0,
            max_new_tokens=4,
            max_attempts=2,
        )


@pytest.mark.slow
def test_tiny_base_in_process_and_cli(tmp_path: Path) -> None:
    from rlino import resolve
    from rlino.policy import load_policy

    model_dir = resolve.tiny_model_dir()
    settings = resolve.task_settings(model_dir)
    assert settings is not None
    policy = load_policy(str(model_dir), device="cpu", dtype="fp32")
    args = dict(prompts=4, samples=8, seed=1, max_new_tokens=96)
    result = gradient_equivalence(
        policy, get_task("countdown", **settings["options"]), template=settings["template"], **args
    )
    assert result["grpo_vs_fisft_cosine"] >= 0.999
    assert result["grpo_vs_token_mean_cosine"] < 0.99
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlino",
            "analyze",
            "equivalence",
            "--prompts",
            "4",
            "--samples",
            "8",
            "--seed",
            "1",
            "--max-new-tokens",
            "96",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as in-process (the fixture): same sums
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cli = json.loads(done.stdout.strip().splitlines()[-1])
    assert cli["grpo_vs_fisft_cosine"] >= 0.999
    # same seed, another process: the same batch and the same numbers
    assert cli["grpo_vs_token_mean_cosine"] == pytest.approx(
        result["grpo_vs_token_mean_cosine"], abs=1e-6
    )
