"""benchmarks/bench_packing.py runs and reports what each layout computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_packing.py"


def test_small_run_reports_fewer_tokens_when_packed() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--prompts", "3", "--samples", "4", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    modes = result["modes"]
    assert modes["none"]["ratio_to_padded"] == 1.0
    # padding is computed only by the padded layout; a shared prompt only once by prefix
    assert modes["none"]["tokens_run"] > result["real_tokens"]
    assert modes["pack"]["tokens_run"] < modes["none"]["tokens_run"]
    assert modes["prefix"]["tokens_run"] < modes["pack"]["tokens_run"]
    assert all(m["median_s"] > 0 for m in modes.values())
