"""benchmarks/bench_step.py: its pure helpers, and a real smoke run of the rlino half (no TRL needed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script as a module (benchmarks/ is not a package)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # as when run as a script: bench_common beside it
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_parity_reward_is_a_deterministic_bit(bench: ModuleType) -> None:
    texts = [f"completion number {i}" for i in range(200)]
    rewards = [bench.parity_reward(t) for t in texts]
    assert rewards == [bench.parity_reward(t) for t in texts]
    assert set(rewards) == {0.0, 1.0}
    assert 0.3 < sum(rewards) / len(rewards) < 0.7  # mixed, so groups are rarely filtered


def test_few_iterations_need_quick(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--iters", "1"])
    assert bench.parse_args(["--quick"]).iters == 1
    assert bench.parse_args([]).iters == 3


def test_summary_drops_warmup(bench: ModuleType) -> None:
    raw = {"iter_s": [9.0, 1.0, 3.0, 2.0], "peak_rss_gb": 1.5, "reward_mean": [0.5, 0.25]}
    s = bench.summarise(raw, warmup=1)
    assert s["median_s"] == 2.0
    assert s["warmup_s"] == [9.0]
    assert s["reward_mean"] == 0.375
    assert s["rollout_s"] is None  # TRL's rows have no rollout split
    s = bench.summarise({**raw, "rollout_s": [5.0, 0.5, 1.0, 0.75]}, warmup=1)
    assert s["rollout_s"] == [0.5, 1.0, 0.75]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rlino_only_quick_run(smollm2_gguf: tuple[Path, str], tmp_path: Path, dtype: str) -> None:
    """The rlino child really trains the tiny case (short completions) and reports JSON last."""
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--rlino-only",
        "--case",
        "tiny",
        "--dtype",
        dtype,
    ]
    cmd += ["--new-tokens", "8", "--warmup", "0", "--threads", "1", "--work-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("case")
    result = json.loads(lines[-1])
    (case,) = result["cases"]
    assert (case["name"], case["prompts"], case["samples"], case["new_tokens"]) == ("tiny", 8, 8, 8)
    assert case["rlino"]["median_s"] > case["rlino"]["rollout_s"][0] > 0
    assert case["dtype"] == dtype
    assert case["rlino"]["peak_rss_gb"] > 0.1
    assert case["trl"] is None and case["speedup"] is None
    assert (tmp_path / "tiny" / "config.json").is_file()
