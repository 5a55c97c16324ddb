"""Data parallelism on CPU (gloo, 2 processes under torchrun) trains exactly like one process.

Real processes, the shipped tiny Countdown model: one update's gradient on 2 ranks (ddp and
FSDP2) equals the 1-process gradient; a 3-iteration run on 2 ranks logs the same rewards and
accuracies and ends with the same weights; a 2-rank FSDP checkpoint resumes on 1 process; a rank
killed mid-run stops the whole job with a non-zero exit, and the run resumes on 2 FSDP ranks.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlino.distributed import World, shard_bounds

PROBE = Path(__file__).with_name("dist_probe.py")
TIMEOUT = 600


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RLINO_FAULT", "WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if fault is not None:
        env["RLINO_FAULT"] = fault
    return env


def _launch(ranks: int, *args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python ARGS` alone (ranks == 1, no torchrun at all) or under torchrun with `ranks`."""
    runner = [sys.executable]
    if ranks > 1:
        runner += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return subprocess.run(
        [*runner, *args], capture_output=True, text=True, timeout=TIMEOUT, env=_env(fault)
    )


# ---- pure parts ----


def test_shards_are_contiguous_balanced_and_cover_everything() -> None:
    for n in range(0, 12):
        for size in range(1, 5):
            bounds = [shard_bounds(n, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_one_process_world_is_a_no_op() -> None:
    world = World()
    t = torch.tensor([1.0, 2.0])
    assert world.all_gather("x") == ["x"] and world.sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert world.sum_floats({"a": 1.5}) == {"a": 1.5} and world.any(False) is False
    assert world.is_main and not world.active and world.shard(5) == (0, 5)


# ---- one update: the 2-rank gradient is the 1-process gradient ----

PROBE_CONFIG = {
    "task": {"name": "countdown"},
    "method": {"name": "grpo", "beta": 0.04, "aggregation": "token-mean"},
    "rollout": {"prompts_per_iter": 5, "samples_per_prompt": 4, "max_new_tokens": 48},
    "optim": {"minibatch_size": 12, "micro_batch_size": 3},
    "eval": {"num_examples": 3},
    "threads": 1,
    "tensorboard": False,
}


@pytest.mark.slow
def test_two_rank_gradients_equal_one_process_gradient(tmp_path: Path) -> None:
    """5 prompts over 2 ranks (3 + 2): uneven shards, a minibatch of 12 rows cut across both
    ranks, token-mean normaliser and a KL term: with ddp, with fsdp (FSDP2) and with LoRA
    adapters under ddp (the KL reference is the base with adapters off), the same samples, and
    each optimiser step's gradient within 1e-5 relative of the 1-process one."""
    results = {}
    lora = {"model": {"lora": {"r": 4, "alpha": 8}}}  # only the adapters train (peft)
    runs = {
        (1, "ddp"): {},
        (2, "ddp"): {},
        (2, "fsdp"): {"dist": {"strategy": "fsdp"}},
        (1, "lora"): lora,
        (2, "lora"): lora,
    }
    for (ranks, name), extra in runs.items():
        out = tmp_path / f"probe-{ranks}-{name}.pt"
        proc = _launch(ranks, str(PROBE), str(out), json.dumps({**PROBE_CONFIG, **extra}))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[ranks, name] = torch.load(out)
    assert results[1, "ddp"]["world"] == 1 and len(results[1, "ddp"]["grads"]) == 2  # 20 rows / 12
    assert results[1, "lora"]["grads"][0].numel() < results[1, "ddp"]["grads"][0].numel() / 2
    for name in ("ddp", "fsdp", "lora"):
        one, two = results[1, "lora" if name == "lora" else "ddp"], results[2, name]
        assert two["world"] == 2
        assert one["texts"] == two["texts"]
        assert torch.equal(one["rewards"], two["rewards"])
        assert len(two["grads"]) == 2
        for g1, g2 in zip(one["grads"], two["grads"], strict=True):
            assert g1.norm() > 0
            assert float((g1 - g2).norm() / g1.norm()) < 1e-5, name
        for key in ("loss/total", "optim/kl", "train/reward_mean", "optim/grad_norm"):
            assert one["metrics"][key] == pytest.approx(two["metrics"][key], rel=1e-5, abs=1e-9)


# ---- whole runs: 2 ranks vs 1 process, resume across world sizes, a crashed rank ----

SETTINGS = [
    "rollout.prompts_per_iter=4", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=40",
    "method.mu=2", "optim.minibatch_size=8", "optim.lr=1e-3", "eval.num_examples=5",
    "eval.every=1", "checkpoint_every=1", "samples_every=1", "iterations=3", "threads=1",
    "tensorboard=false",
]  # fmt: skip
TRAIN = ["-m", "rlino", "train", "--task", "countdown", "--quiet"]
COMPARED = ("train/reward_mean", "train/accuracy", "train/length_mean", "eval/accuracy")


def _train(
    ranks: int, run: Path, *extra: str, fault: str | None = None
) -> subprocess.CompletedProcess[str]:
    sets = [x for s in SETTINGS for x in ("--set", s)]
    return _launch(ranks, *TRAIN, *sets, "--out", str(run), *extra, fault=fault)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [r["iteration"] for r in ra] == [r["iteration"] for r in rb] == [0, 1, 2, 3]
    for x, y in zip(ra, rb, strict=True):
        assert {k: x.get(k) for k in COMPARED} == {k: y.get(k) for k in COMPARED}
    wa, wb = (load_file(str(p / "final" / "model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


@pytest.mark.slow
def test_two_rank_run_resume_on_one_and_crash(tmp_path: Path) -> None:
    one, two, moved, crashed = (tmp_path / n for n in ("one", "two", "moved", "crashed"))
    proc = _train(1, one)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _train(2, two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(one, two)
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()

    # a checkpoint written by 2 FSDP ranks (gathered whole), resumed by 1 process
    proc = _train(2, moved, "--stop-after", "2", "--set", "dist.strategy=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (moved / "final").exists()
    resume = _launch(1, "-m", "rlino", "train", "--resume", str(moved), "--quiet")
    assert resume.returncode == 0, resume.stderr[-3000:]
    _assert_same_run(one, moved)

    # rank 1 killed during iteration 2's evaluation: the job fails; the run resumes on 2 FSDP
    # ranks (the optimiser state sharded on load) and ends where the others did
    proc = _train(2, crashed, fault="eval:2@1")
    assert proc.returncode != 0
    assert "rank" in proc.stderr.lower() or "failed" in proc.stderr.lower(), proc.stderr[-3000:]
    assert not (crashed / "final").exists()
    fsdp = ["--resume", str(crashed), "--set", "dist.strategy=fsdp", "--quiet"]
    resume = _launch(2, "-m", "rlino", "train", *fsdp)
    assert resume.returncode == 0, resume.stderr[-3000:]
    _assert_same_run(one, crashed)
