"""benchmarks/bench_update.py: variants run in their own processes, overrides take effect."""

from __future__ import annotations

import pytest
from bench_modules import load_benchmark

bench_update = load_benchmark("bench_update")

SMALL = ["--model", "tiny", "--dtype", "fp32", "--threads", "1", "--prompts", "2", "--samples", "2",
         "--prompt-lens", "4", "8", "--lens", "3", "9", "--repeats", "2", "--rounds", "1"]  # fmt: skip


@pytest.mark.slow
def test_two_variants_alternate_and_report_what_they_ran() -> None:
    out = bench_update.main([*SMALL, "--variant", "padded:optim.packing=none,keep_freed_memory=false",
                             "--variant", "packed:optim.packing=pack"])  # fmt: skip
    padded, packed = out["variants"]["padded"], out["variants"]["packed"]
    assert padded["applied"] == {"optim.packing": "none", "keep_freed_memory": False}
    assert packed["applied"] == {"optim.packing": "pack"}
    assert padded["ratio"] == 1.0
    for v in (padded, packed):
        assert len(v["update_s"]) == 2 and min(v["update_s"]) > 0 and v["peak_rss_gb"] > 0
    ratio = packed["median_update_s"] / padded["median_update_s"]  # both rounded to 0.1 ms
    assert packed["ratio"] == pytest.approx(ratio, rel=0.02)


@pytest.mark.parametrize(
    ("variant", "message"),
    [("nocolon", "NAME[@SOURCE]"), ("x@/nonexistent:", "not an rlino source tree")],
)
def test_bad_variants_exit_with_one_line(variant: str, message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_update.main([*SMALL, "--variant", variant])
    assert message in str(exc.value)
