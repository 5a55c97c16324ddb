"""pass@k of a comparison: the estimator over prompts (hand values, brute force), settings, the
report section, and a tiny `rlino compare` grid with pass@k on, over two base models."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
from pathlib import Path

import pytest
from toy_tasks import letter_task

from rlino.analysis.compare import run_compare, spec_from_dict
from rlino.analysis.passk import (
    PASSK_FILE,
    PasskSpec,
    parse_passk,
    pass_at_curve,
    passk_report,
    split_label,
    stored,
)
from rlino.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the estimator


def test_pass_at_curve_hand_values() -> None:
    # n = 4; prompts with 0, 1 and 4 right. pass@1 = c/n; pass@2 of c=1: 1 - C(3,2)/C(4,2) = 1/2;
    # pass@4 of c=1: 1. Means over the three prompts:
    curve = pass_at_curve([0, 1, 4], 4, [1, 2, 4])
    assert curve[1] == pytest.approx((0 + 0.25 + 1) / 3)
    assert curve[2] == pytest.approx((0 + 0.5 + 1) / 3)
    assert curve[4] == pytest.approx((0 + 1 + 1) / 3)
    # n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_curve([2], 5, [2])[2] == pytest.approx(0.7)


def test_pass_at_curve_matches_enumerating_every_subset_of_samples() -> None:
    """Draw per-prompt right/wrong samples, then average over prompts the fraction of all size-k
    subsets of each prompt's samples that hold a right one: the definition of pass@k."""
    rng = random.Random(0)
    for n in (1, 2, 3, 5, 8):
        outcomes = [[rng.random() < p for _ in range(n)] for p in (0.0, 0.1, 0.4, 0.7, 1.0)]
        ks = list(range(1, n + 1))
        curve = pass_at_curve([sum(o) for o in outcomes], n, ks)
        for k in ks:
            brute = 0.0
            for o in outcomes:
                subsets = list(itertools.combinations(o, k))
                brute += sum(any(s) for s in subsets) / len(subsets)
            assert curve[k] == pytest.approx(brute / len(outcomes), abs=1e-12), (n, k)


def test_pass_at_curve_is_stable_at_n_64() -> None:
    curve = pass_at_curve([1, 10, 63], 64, [1, 32, 64])
    c10 = 1 - math.comb(54, 32) / math.comb(64, 32)
    assert curve[32] == pytest.approx((0.5 + c10 + 1.0) / 3, abs=1e-12)
    assert curve[64] == 1.0 and curve[1] == pytest.approx((1 + 10 + 63) / 64 / 3)
    with pytest.raises(ValueError):
        pass_at_curve([], 4, [1])


def test_ks_are_powers_of_two_and_n() -> None:
    assert PasskSpec().ks() == [1, 2, 4, 8, 16, 32, 64]
    assert PasskSpec(n=6).ks() == [1, 2, 4, 6]
    assert PasskSpec(n=1).ks() == [1]


def test_parse_passk() -> None:
    assert parse_passk(None) is None and parse_passk(False) is None
    assert parse_passk(True) == PasskSpec()
    assert parse_passk({"n": 4, "prompts": 3}) == PasskSpec(n=4, prompts=3)
    for bad, message in [
        ({"n": 0}, "must be >= 1"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"samples": 4}, "unknown config key 'passk.samples'"),
        ("yes", "must be true, false or a mapping"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_passk(bad)


def test_a_stored_result_is_reused_only_with_the_same_settings(tmp_path: Path) -> None:
    path = tmp_path / PASSK_FILE
    assert stored(path, PasskSpec()) is None
    path.write_text(json.dumps({"n": 4, "prompts": 3, "temperature": 1.0, "pass_at": {}}))
    assert stored(path, PasskSpec(n=4, prompts=3)) is not None
    assert stored(path, PasskSpec(n=4, prompts=5)) is None
    assert stored(path, PasskSpec(n=8, prompts=3)) is None
    path.write_text('{"n": 4, "pro')  # torn
    assert stored(path, PasskSpec(n=4, prompts=3)) is None


# ---------------------------------------------------------------- the report section


def _passk_file(path: Path, values: dict[int, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"n": 4, "prompts": 3, "prompts_used": 3, "temperature": 1.0}
    path.write_text(json.dumps({**data, "pass_at": {str(k): v for k, v in values.items()}}))


def test_report_section_with_intervals_over_seeds(tmp_path: Path) -> None:
    runs = []
    for seed, p1 in enumerate([0.2, 0.3, 0.4]):
        run = tmp_path / "runs" / "nsr@weak" / f"seed{seed}"
        _passk_file(run / PASSK_FILE, {1: p1, 2: p1 + 0.1, 4: 0.9})
        runs.append(run)
    _passk_file(tmp_path / "base_passk" / "weak.json", {1: 0.1, 2: 0.2, 4: 0.5})
    section, plot, data = passk_report(tmp_path, runs)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(3)
    assert data["ks"] == [1, 2, 4]
    assert data["methods"]["nsr@weak"]["1"]["ci_low"] == pytest.approx(0.3 - half, abs=1e-6)
    assert "| nsr@weak | 0,1,2 | 30.0 [5.2, 54.8] | 40.0 [15.2, 64.8] | 90.0 [90.0, 90.0] |" in (
        section
    )
    assert "| base@weak | 0 | 10.0 | 20.0 | 50.0 |" in section
    assert plot is not None and plot.stat().st_size > 1000
    assert split_label("fisft+-@strong") == ("fisft+-", "strong")
    assert passk_report(tmp_path / "none", []) == ("", None, {})


# ---------------------------------------------------------------- a tiny grid end to end


letter_task("passk-compare-e", "e", train=32, test=6, stop_at_letter=True)


def test_compare_grid_over_two_bases_with_passk(
    tiny_random_model_dir: Path, tmp_path: Path
) -> None:
    from rlino.train import train

    other = tmp_path / "other-base"
    shutil.copytree(tiny_random_model_dir, other)
    spec = spec_from_dict(
        {
            "title": "passk grid",
            "bases": [{"label": "a", "path": str(tiny_random_model_dir)}, str(other)],
            "methods": ["grpo", "nsr"],
            "seeds": [0],
            "passk": {"n": 4, "prompts": 3},
            "train": {
                "task": {"name": "passk-compare-e"},
                "rollout": {"prompts_per_iter": 2, "samples_per_prompt": 4, "max_new_tokens": 10},
                "optim": {"lr": 1e-2},
                "eval": {"every": 1, "num_examples": 4},
                "iterations": 1,
                "samples_every": 0,
                "tensorboard": False,
            },
        }
    )
    names = ["grpo@a/seed0", "nsr@a/seed0", "grpo@other-base/seed0", "nsr@other-base/seed0"]
    assert spec.run_names() == names
    calls: list[str] = []

    def counting_train(config, run_dir, **kw):
        calls.append(f"{run_dir.parent.name}/{run_dir.name}")
        return train(config, run_dir, **kw)

    out = tmp_path / "cmp"
    run_compare(spec, out, progress=False, train_fn=counting_train)
    assert calls == names
    for name in names:
        data = json.loads((out / "runs" / name / PASSK_FILE).read_text())
        assert (data["n"], data["prompts_used"], len(data["correct_counts"])) == (4, 3, 3)
        assert list(data["pass_at"]) == ["1", "2", "4"]
        assert all(0 <= c <= 4 for c in data["correct_counts"])
        assert data["pass_at"]["1"] == pytest.approx(sum(data["correct_counts"]) / 12)
    for base in ("a", "other-base"):
        assert (out / "base_passk" / f"{base}.json").is_file()
    report = (out / "report.md").read_text()
    assert "## pass@k" in report and "| nsr@other-base | 0 |" in report and "passk.png" in report
    assert "| base@a | 0 |" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passk"]["ks"] == [1, 2, 4] and (out / "passk.png").is_file()
    config = json.loads((out / "compare.json").read_text())["spec"]
    assert config["passk"]["n"] == 4 and config["bases"][1]["label"] == "other-base"

    # resumable: nothing is trained or evaluated again; a missing passk.json is measured alone
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed0/passk.json")}
    (out / "runs" / "nsr@a" / "seed0" / PASSK_FILE).unlink()
    calls.clear()
    run_compare(spec, out, progress=False, train_fn=counting_train)
    assert calls == []
    assert (out / "runs" / "nsr@a" / "seed0" / PASSK_FILE).is_file()
    for path, mtime in mtimes.items():
        if "nsr@a" not in str(path):
            assert path.stat().st_mtime_ns == mtime, path


def test_bases_spec_errors(tiny_random_model_dir: Path) -> None:
    base = {"methods": ["grpo"], "train": {"iterations": 1}}
    with pytest.raises(UserError, match="not both"):
        spec_from_dict(
            {
                **base,
                "bases": [str(tiny_random_model_dir)],
                "train": {"model": {"path": str(tiny_random_model_dir)}},
            }
        )
    with pytest.raises(UserError, match="base labels must be distinct"):
        spec_from_dict({**base, "bases": [str(tiny_random_model_dir)] * 2})
    with pytest.raises(UserError, match="unknown tiny base 'tiny:nope'"):
        spec_from_dict({**base, "bases": ["tiny:nope"]})
    with pytest.raises(UserError, match="a base entry is a model path"):
        spec_from_dict({**base, "bases": [{"label": "x"}]})
    with pytest.raises(UserError, match="does not exist"):
        spec_from_dict({**base, "bases": ["/no/such/model"]})
    one = spec_from_dict({**base, "bases": [str(tiny_random_model_dir)]})
    assert one.run_names() == ["grpo/seed0"]  # a single base keeps plain labels
