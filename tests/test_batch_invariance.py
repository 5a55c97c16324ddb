"""benchmarks/batch_invariance.py: one batch vs rank-sized shards, on the built-in tiny base."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_invariance.py"


def load_script():
    spec = importlib.util.spec_from_file_location("batch_invariance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["batch_invariance"] = module
    spec.loader.exec_module(module)
    return module


def test_first_difference() -> None:
    script = load_script()
    assert script.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert script.first_difference([1, 2], [1, 2, 3]) == 2


def test_fp32_shards_sample_what_one_batch_samples() -> None:
    out = load_script().main(
        ["--prompts", "6", "--samples", "3", "--max-new-tokens", "24", "--ranks", "3"]
    )
    assert out["completions"] == 18
    assert out["differ"] == 0 and out["first_difference"] is None
