"""Kills at any moment and two processes on one run dir: the run resumes exactly, or refuses.

The slow test SIGKILLs real `rlino train` processes (at hooked points: rlino.faults, and at seeded
random moments) until the run finishes, then compares it with an uninterrupted run bit for bit.
The fast ones check the parts: log repair, a resume with no checkpoint, the run dir's lock.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config

from rlino.config import load_config
from rlino.errors import UserError
from rlino.runlock import RunInUse, RunLock
from rlino.runlog import MetricsLog, repair_jsonl
from rlino.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path: Path) -> list[dict]:
    """Every line of a JSONL file, parsed: fails on a torn or non-JSON line."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(path: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in _rows(path)
    ]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(str(p / "final" / "model.safetensors")) for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlino", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


# ---- log repair (pure) ----


def _line(iteration: int, **extra: object) -> bytes:
    return (json.dumps({"iteration": iteration, **extra}) + "\n").encode()


def test_repair_drops_torn_line_and_later_rows_keeping_bytes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    good = _line(0, x=0.1) + _line(1, x=1 / 3) + _line(2, x=None)
    path.write_bytes(good + _line(3) + _line(4)[:7])  # row 3 after the checkpoint, a torn row 4
    repair_jsonl(path, 2)
    assert path.read_bytes() == good  # the kept lines byte for byte, not re-serialised
    inode = path.stat().st_ino
    repair_jsonl(path, 2)
    assert path.stat().st_ino == inode  # nothing to drop: not rewritten
    path.write_bytes(good + _line(3)[:-1])  # the newline was never written: torn as well
    repair_jsonl(path, 5)
    assert path.read_bytes() == good
    repair_jsonl(path, -1)  # no checkpoint: the run starts over
    assert path.read_bytes() == b""
    repair_jsonl(tmp_path / "missing.jsonl", 3)  # no file: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def test_metrics_log_on_resume_keeps_rows_through_the_checkpoint(tmp_path: Path) -> None:
    for name in ("metrics.jsonl", "samples.jsonl"):
        (tmp_path / name).write_bytes(_line(0) + _line(1) + _line(2) + b'{"itera')
    MetricsLog(tmp_path, tensorboard=False, resume_from=1)
    assert [r["iteration"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1]
    assert [r["iteration"] for r in _rows(tmp_path / "samples.jsonl")] == [0, 1]
    log = MetricsLog(tmp_path, tensorboard=False)  # no checkpoint: iteration 0 is logged again
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""
    log.log({"iteration": 0, "eval/accuracy": float("nan")})
    log.log_samples([{"iteration": 0, "response": "a"}, {"iteration": 0, "response": "b"}])
    log.sync()
    assert _rows(tmp_path / "metrics.jsonl") == [{"iteration": 0, "eval/accuracy": None}]
    assert len(_rows(tmp_path / "samples.jsonl")) == 2


# ---- resumes after a crash, in process (the toy task of test_train) ----


def test_resume_killed_in_first_iteration_starts_clean(
    tiny_random_model_dir: Path, tmp_path: Path
) -> None:
    """Killed while appending row 1, before any checkpoint: the resume starts from scratch and
    logs iteration 0 once (it used to keep the old row 0 and log it again)."""
    cfg = tiny_config(tiny_random_model_dir, iterations=2, checkpoint_every=0, samples_every=1)
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(cfg, straight, progress=False)
    run.mkdir()
    shutil.copy(straight / "config.yaml", run / "config.yaml")
    lines = (straight / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(lines[0] + lines[1][:25])
    (run / "checkpoints" / ".tmp-iter_000001").mkdir(parents=True)  # a half-begun checkpoint
    result = train(cfg, run, resume=True, progress=False)
    assert result.completed and result.start_eval is not None
    assert _comparable(run / "metrics.jsonl") == _comparable(straight / "metrics.jsonl")
    assert (run / "samples.jsonl").read_bytes() == (straight / "samples.jsonl").read_bytes()
    assert _same_weights(run, straight)


def test_crash_after_logging_drops_rows_past_the_checkpoint(
    tiny_random_model_dir: Path, tmp_path: Path
) -> None:
    """Crash after row 3 and its samples were logged (checkpoint 2 the latest), then a torn row 4:
    the resume drops row 3 and the torn line, redoes 3 and 4; TensorBoard purges steps > 2."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tiny_random_model_dir, samples_every=1, tensorboard=True)
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(cfg, straight, progress=False)

    def crash(iteration: int, row: dict) -> None:
        if iteration == 3:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, run, progress=False, on_iteration=crash)
    assert [r["iteration"] for r in _rows(run / "metrics.jsonl")] == [0, 1, 2, 3]
    with (run / "metrics.jsonl").open("ab") as f:
        f.write((straight / "metrics.jsonl").read_bytes().splitlines(keepends=True)[4][:30])
    result = train(cfg, run, resume=True, progress=False)
    assert result.completed and result.start_eval is None
    assert _comparable(run / "metrics.jsonl") == _comparable(straight / "metrics.jsonl")
    assert (run / "samples.jsonl").read_bytes() == (straight / "samples.jsonl").read_bytes()
    assert _same_weights(run, straight)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/reward_mean")] == [1, 2, 3, 4]


# ---- one process per run dir ----


def test_run_lock_excludes_a_second_holder_until_released(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    second.check_free()  # no lock file yet: free, and nothing created
    assert not (tmp_path / ".lock").exists()
    with first:
        first.acquire()
        first.acquire()  # idempotent
        assert first.locked
        with pytest.raises(RunInUse, match=rf"in use by another process \(pid {os.getpid()}\)"):
            second.acquire()
        with pytest.raises(RunInUse):
            second.check_free()
        RunLock(tmp_path, held=False).acquire()  # a torchrun rank > 0 never takes it
    assert not first.locked
    with second:
        second.acquire()  # released when the first left its block
        assert second.locked


def _countdown_run(model_dir: Path, run: Path) -> None:
    """A one-iteration countdown run (a task a subprocess knows) to resume from the CLI."""
    cfg = load_config(
        None,
        {
            "model": {"path": str(model_dir)},
            "task": {"name": "countdown", "options": {"max_number": 20}},
            "rollout": {"prompts_per_iter": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
            "eval": {"num_examples": 2},
            "iterations": 1,
            "tensorboard": False,
        },
    )
    train(cfg, run, progress=False)


def test_second_process_on_a_run_dir_fails_at_once(
    tiny_random_model_dir: Path, tmp_path: Path
) -> None:
    """A live holder (a process that sleeps): --resume and a fresh train into the dir exit 2 with
    one line, before loading anything; once the holder is SIGKILLed, --resume just works."""
    run = tmp_path / "run"
    _countdown_run(tiny_random_model_dir, run)
    cfg = load_config(str(run / "config.yaml"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom rlino.runlock import RunLock\n"
            "RunLock(Path(sys.argv[1])).acquire()\nprint('held', flush=True)\ntime.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        for resume in (True, False):  # in process: the same refusal, as a UserError
            with pytest.raises(UserError, match=rf"in use by another process \(pid {holder.pid}\)"):
                train(cfg, run, resume=resume, progress=False)
        for args in (["--resume", str(run)], ["--out", str(run), "--task", "countdown"]):
            proc = _cli("train", *args, "--iterations", "2", "--quiet")
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr
            assert lines[0] == (
                f"error: {run} is in use by another process (pid {holder.pid}); "
                "wait for it to end or stop it first"
            )
    finally:
        holder.kill()
        holder.wait()
    assert [r["iteration"] for r in _rows(run / "metrics.jsonl")] == [0, 1]  # untouched
    proc = _cli("train", "--resume", str(run), "--iterations", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [r["iteration"] for r in _rows(run / "metrics.jsonl")] == [0, 1, 2]


# ---- SIGKILL at any moment: real processes ----


# The built-in countdown task on the shipped tiny model (a real signal: rewards vary), 6 short
# iterations; checkpoints every 2 and evaluations every 3 leave rows to drop between them.
SETTINGS = [
    "rollout.prompts_per_iter=2", "rollout.samples_per_prompt=8", "rollout.max_new_tokens=64",
    "optim.lr=1e-3", "eval.num_examples=4", "eval.every=3", "checkpoint_every=2",
    "samples_every=1", "iterations=6", "threads=1", "tensorboard=false",
]  # fmt: skip
FRESH = ["train", "--task", "countdown", "--quiet", *(x for s in SETTINGS for x in ("--set", s))]


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RLINO_FAULT"}
    env["OMP_NUM_THREADS"] = "1"
    if fault is not None:
        env["RLINO_FAULT"] = fault
    return env


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("iter_*"))


def _run_and_kill(args: list[str], run: Path, delay: float) -> tuple[int, float]:
    """Start `rlino train` and SIGKILL it `delay` s after it has loaded the model (it then writes
    `config.yaml` anew), unless it ends first; its exit code and its seconds from that moment."""
    config = run / "config.yaml"
    before = config.stat().st_ino if config.exists() else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlino", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if config.exists() and config.stat().st_ino != before:
            break
        time.sleep(0.01)
    loaded = time.monotonic()
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode, time.monotonic() - loaded


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Two interrupted runs of the same config, each resumed after every kill until it finishes:
    one killed at hooked points, one at seeded random moments; both equal the uninterrupted run."""
    straight, hooked, shot = tmp_path / "straight", tmp_path / "hooked", tmp_path / "random"
    code, seconds = _run_and_kill([*FRESH, "--out", str(straight)], straight, 600.0)
    assert code == 0  # `seconds`: how long a whole run takes here, once it has loaded
    resume = ["train", "--resume", str(hooked), "--quiet"]

    def killed(args: list[str], fault: str) -> None:
        proc = _cli(*args, env=_env(fault))
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr)

    # Hooked kills, each a resume of the one before; what each left behind shows it hit its mark.
    killed([*FRESH, "--out", str(hooked)], "eval:0")  # during the first evaluation
    assert (hooked / "config.yaml").exists() and not (hooked / "metrics.jsonl").exists()
    killed(resume, "metrics:1")  # in the first iteration, writing its row: no checkpoint yet
    assert len(_rows_upto_torn(hooked / "metrics.jsonl")) == 1 and not _checkpoints(hooked)
    killed(resume, "samples:3")  # a torn samples line past checkpoint 2
    assert _checkpoints(hooked) == ["iter_000002"]
    assert [r["iteration"] for r in _rows(hooked / "metrics.jsonl")] == [0, 1, 2, 3]
    assert _rows_upto_torn(hooked / "samples.jsonl")[-1]["iteration"] == 3
    killed(resume, "eval:3")  # during an evaluation
    assert [r["iteration"] for r in _rows(hooked / "metrics.jsonl")] == [0, 1, 2]  # 3 dropped
    killed(resume, "checkpoint:4")  # checkpoint 4 half written, rows 3 and 4 logged
    torn = hooked / "checkpoints" / ".tmp-iter_000004"
    assert (torn / "model").is_dir() and not (torn / "state.json").exists()
    assert _checkpoints(hooked) == ["iter_000002"]
    killed(resume, "checkpoint:6")  # the last checkpoint, half written: no final model
    assert _checkpoints(hooked) == ["iter_000002", "iter_000004"]
    assert not (hooked / "final").exists()
    assert _cli(*resume, env=_env()).returncode == 0
    _assert_same_run(hooked, straight)

    # SIGKILL at seeded random moments after the model loaded (repairing the logs, sampling,
    # updating, evaluating, writing a checkpoint or the final model), within 60% of a whole run's
    # time so that most attempts die; resume after each kill, and after 6 run to the end.
    rng = random.Random(12)
    args, kills = [*FRESH, "--out", str(shot)], 0
    while _run_and_kill(args, shot, rng.uniform(0, 0.6 * seconds) if kills < 6 else 600.0)[0]:
        args, kills = ["train", "--resume", str(shot), "--quiet"], kills + 1
    _assert_same_run(shot, straight)


def _assert_same_run(run: Path, straight: Path) -> None:
    """Every metric row (timing and memory aside), every sample and the final weights equal the
    uninterrupted run's; every line of both logs parses, and no iteration is logged twice."""
    assert _comparable(run / "metrics.jsonl") == _comparable(straight / "metrics.jsonl")
    assert [r["iteration"] for r in _rows(run / "metrics.jsonl")] == list(range(7))
    samples = _rows(run / "samples.jsonl")
    assert samples == _rows(straight / "samples.jsonl")
    assert [r["iteration"] for r in samples] == sorted(r["iteration"] for r in samples)
    assert _same_weights(run, straight)


def _rows_upto_torn(path: Path) -> list[dict]:
    """The complete rows of a file whose last line a kill tore (asserting that it did)."""
    lines = path.read_text().splitlines(keepends=True)
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[-1])
    return [json.loads(line) for line in lines[:-1]]
