"""The training loop on a real (tiny, random) model: updates, run dir, exact resume, bad configs.

A user task registered here ("contains-a": correct when the completion contains the letter a)
gives a random character model a mix of right and wrong samples, so every method has a signal.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_tasks import letter_task

from rlino.config import load_config
from rlino.errors import UserError
from rlino.step import prompt_order
from rlino.train import train

# A toy user task: any completion with an "a" in it is right.
letter_task("contains-a", "a", train=64, test=8, question="item")


def tiny_config(model_dir: Path, method_name: str = "grpo", **extra: object) -> object:
    overrides = {
        "model": {"path": str(model_dir)},
        "task": {"name": "contains-a"},
        "method": {"name": method_name},
        "rollout": {"prompts_per_iter": 4, "samples_per_prompt": 4, "max_new_tokens": 12},
        "optim": {"lr": 1e-2, "minibatch_size": 8, "micro_batch_size": 4},
        "eval": {"every": 2, "num_examples": 4},
        "iterations": 4,
        "checkpoint_every": 2,
        "samples_every": 2,
        "tensorboard": False,
    }
    for key, value in extra.items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(None, overrides)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("method", ["grpo", "fisft+-", "fisft+", "fisft-grpo", "raft"])
def test_parameters_change_after_one_step(
    tiny_random_model_dir: Path, tmp_path: Path, method: str
) -> None:
    cfg = tiny_config(tiny_random_model_dir, method, iterations=1)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.completed
    before = load_file(str(tiny_random_model_dir / "model.safetensors"))
    after = weights(tmp_path / "run")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"{method}: no parameter changed after one step"
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert 0 < row["train/accuracy"] < 1  # the toy task gives a mixed signal


def test_run_dir_layout_and_metrics(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_random_model_dir, "grpo", method={"beta": 0.1}, tensorboard=True)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    assert (run / "config.yaml").exists() and list((run / "tb").glob("events.*"))
    assert load_config(str(run / "config.yaml")) == cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    required = [
        "train/reward_mean", "train/accuracy", "train/groups_filtered", "train/length_correct",
        "train/length_wrong", "train/length_mean", "loss/total", "loss/policy", "loss/kl",
        "optim/grad_norm", "optim/lr", "optim/kl", "optim/clip_frac", "train/entropy",
        "time/rollout_s", "time/update_s", "time/tokens_per_s", "mem/peak_rss_gb",
    ]  # fmt: skip
    for row in rows[1:]:
        assert all(key in row for key in required), set(required) - set(row)
    assert {"eval/accuracy", "eval/length_correct", "eval/length_wrong"} <= set(rows[0])
    assert "eval/accuracy" in rows[2] and "eval/accuracy" not in rows[1]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["iteration"] for s in samples} == {2, 4}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000002", "iter_000004"]
    AutoModelForCausalLM.from_pretrained(run / "final")


def _comparable(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


@pytest.mark.parametrize(
    ("method", "dtype"),
    [("grpo", "fp32"), ("fisft+-", "fp32"), ("grpo", "bf16"), ("grpo", "fp16")],
)
def test_resume_after_2_plus_2_equals_4_straight(
    tiny_random_model_dir: Path, tmp_path: Path, method: str, dtype: str
) -> None:
    """Also under mixed precision: the checkpoint holds the fp32 master weights (the resumed run's
    compute copy is rebuilt from them) and, for fp16, the loss scaler's state."""
    cfg = tiny_config(tiny_random_model_dir, method, checkpoint_every=0, model={"dtype": dtype})
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, straight, progress=False)
    first = train(cfg, split, progress=False, stop_after=2)
    assert not first.completed and first.iterations_done == 2
    assert not (split / "final").exists()
    second = train(cfg, split, resume=True, progress=False)
    assert second.completed and second.iterations_done == 4
    assert _comparable(straight / "metrics.jsonl") == _comparable(split / "metrics.jsonl")
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for v in a.values()} == {torch.float32}  # the master weights
    assert bool(list((split / "checkpoints").glob("*/scaler.pt"))) == (dtype == "fp16")


def test_half_written_checkpoint_is_ignored(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_random_model_dir, "fisft+", checkpoint_every=0)
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=2)
    torn = run / "checkpoints" / ".tmp-iter_000003"  # a kill during the next checkpoint's write
    (torn / "model").mkdir(parents=True)
    (torn / "optimizer.pt").write_bytes(b"\x00garbage")
    result = train(cfg, run, resume=True, progress=False)
    assert result.completed and result.iterations_done == 4


def test_existing_run_dir_needs_resume(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_random_model_dir, "raft", iterations=1)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)


def test_prompt_order_is_a_function_of_seed_and_iteration() -> None:
    assert prompt_order(10, 0, 3, 4) == prompt_order(10, 0, 3, 4)
    assert prompt_order(10, 0, 3, 4) != prompt_order(10, 1, 3, 4)
    epoch = [i for it in range(5) for i in prompt_order(10, 7, it, 2)]
    assert sorted(epoch) == list(range(10))  # each epoch visits every example once


def test_token_slices_respect_rows_and_token_budget() -> None:
    """Micro-batches: consecutive, complete, within both caps; an oversize row stands alone."""
    from rlino.update import MicroBatching, TokenBatch, micro_slices

    start = 4  # 4 prompt columns, then completions (left-padded prompts, right-padded completions)
    prompt_lens, completion_lens = [2, 4, 3, 1, 4, 2, 2], [5, 1, 6, 30, 2, 2, 3]
    width = start + max(completion_lens)
    attn = torch.zeros((len(prompt_lens), width), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens, strict=True)):
        attn[i, start - p : start] = True
        attn[i, start : start + c] = True
    rows = torch.arange(len(prompt_lens))
    batch = TokenBatch(torch.zeros_like(attn, dtype=torch.long), attn, attn[:, start:], start)
    slices = list(micro_slices(batch, rows, MicroBatching(max_rows=3, max_tokens=20)))
    assert torch.equal(torch.cat(slices), rows)
    for piece in slices:
        size = len(piece) * (
            max(prompt_lens[i] for i in piece) + max(completion_lens[i] for i in piece)
        )
        assert len(piece) <= 3 and (size <= 20 or len(piece) == 1)
    assert [len(piece) for piece in slices] == [2, 1, 1, 2, 1]  # row 3 (31 tokens) alone
    no_cap = micro_slices(batch, rows, MicroBatching(4, 0))  # 0 = no token cap
    assert [len(p) for p in no_cap] == [4, 3]


def test_micro_batching_and_checkpointing_keep_the_gradient(tiny_random_model_dir: Path) -> None:
    """One minibatch, three ways (all rows at once; one row per pass; recomputed activations): same
    gradient. Gradient accumulation must be exact, whatever the memory knobs say."""
    import dataclasses

    from rlino.methods import weigh
    from rlino.policy import set_activation_checkpointing
    from rlino.setup import build
    from rlino.step import rollout
    from rlino.update import TokenBatch, update

    base = tiny_config(tiny_random_model_dir, "grpo", optim={"minibatch_size": 16})
    setup = build(base)
    scored = rollout(setup, 0)
    weights = weigh(setup.method, setup.params, scored)
    assert (weights != 0).any()
    batch = TokenBatch.from_rollouts(scored.rollouts, setup.policy.device)
    start = {k: v.clone() for k, v in setup.policy.model.state_dict().items()}

    def gradient(**optim: object) -> list[torch.Tensor]:
        config = dataclasses.replace(base, optim=dataclasses.replace(base.optim, **optim))
        model = setup.policy.model
        model.load_state_dict(start)
        set_activation_checkpointing(model, config.optim.gradient_checkpointing)
        active = getattr(model, "is_activation_checkpointing", None)
        if active is None:  # transformers before the rename
            active = model.is_gradient_checkpointing
        assert active == config.optim.gradient_checkpointing
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        update(dataclasses.replace(setup, config=config), batch, weights, optimizer)
        set_activation_checkpointing(model, False)
        return [p.grad.clone() for p in model.parameters()]

    whole = gradient(micro_batch_size=16, micro_batch_tokens=0)
    for other in (
        gradient(micro_batch_size=16, micro_batch_tokens=1),
        gradient(micro_batch_size=16, micro_batch_tokens=0, gradient_checkpointing=True),
    ):
        for a, b in zip(whole, other, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def run_cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlino", *args], capture_output=True, text=True, timeout=300, **kw
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "optim.nosuch=1"], "unknown config key 'optim.nosuch'"),
        (["--set", "optim.lr=-1"], "optim.lr must be > 0"),
        (["--set", "optim.lr=fast"], "optim.lr must be a number"),
        (["--set", "optim.micro_batch_tokens=-5"], "optim.micro_batch_tokens must be >= 0"),
        (["--set", "rollout.samples_per_prompt=1"], "at least 2 samples per prompt"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--method", "ppo"], "unknown method"),
        (["--config", "no-such-preset"], "not found"),
        (["--set", "iterations"], "key=value"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_cli("train", "--out", str(tmp_path / "run"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_train_and_ctrl_c_checkpoints(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [
        "--model", str(tiny_random_model_dir), "--set", "task.options.max_number=20",
        "--set", "rollout.prompts_per_iter=2", "--set", "rollout.samples_per_prompt=2",
        "--set", "rollout.max_new_tokens=8", "--set", "eval.num_examples=2", "--quiet",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlino",
            "train",
            "--out",
            str(run),
            "--iterations",
            "100000",
            *common,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = (
            (run / "metrics.jsonl").read_text().splitlines()
            if (run / "metrics.jsonl").exists()
            else []
        )
        if len(rows) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped" in out
    done = json.loads(
        (run / "checkpoints").glob("iter_*").__next__().joinpath("state.json").read_text()
    )
    assert done["iteration"] >= 1
    resumed = run_cli(
        "train", "--resume", str(run), "--iterations", str(done["iteration"] + 1), "--quiet"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "final" / "config.json").exists()
