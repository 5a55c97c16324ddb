"""`rlino demo` end to end on the shipped tiny base, shrunk to one seed and one iteration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_all_methods_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlino",
            "demo",
            "--out",
            str(out),
            "--seeds",
            "0",
            "--iterations",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"grpo", "grpo-nokl", "fisft+", "fisft-", "fisft+-"}
    assert all(row["finished"] == 1 for row in summary["methods"].values())
    equivalence = json.loads((out / "equivalence.json").read_text())
    assert equivalence["grpo_vs_fisft_cosine"] >= 0.999
    assert "gradient cosine" in proc.stdout and str(out / "report.md") in proc.stdout
    for plot in summary["plots"]:
        assert (out / plot).stat().st_size > 1000
