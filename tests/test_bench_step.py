"""benchmarks/bench_step.py, rlino_step.py, trl_step.py and bench_util.py: their pure helpers
(FLOP and utilisation arithmetic on hand-computed numbers, the TRL half's bookkeeping), the weight
shapes of a small real model, and real smoke runs of the rlino half (no TRL needed)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from bench_modules import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script as a module."""
    return load_benchmark("bench_step")


@pytest.fixture(scope="module")
def util(bench: ModuleType) -> ModuleType:
    """benchmarks/bench_util.py (importable once `bench` put benchmarks/ on the path)."""
    return importlib.import_module("bench_util")


@pytest.fixture(scope="module")
def rlino_half(bench: ModuleType) -> ModuleType:
    """benchmarks/rlino_step.py, the rlino child's code."""
    return importlib.import_module("rlino_step")


@pytest.fixture(scope="module")
def trl_half(bench: ModuleType) -> ModuleType:
    """benchmarks/trl_step.py; its helpers need no trl (that is imported inside run_trl)."""
    return importlib.import_module("trl_step")


def test_parity_reward_is_a_deterministic_bit(rlino_half: ModuleType) -> None:
    texts = [f"completion number {i}" for i in range(200)]
    rewards = [rlino_half.parity_reward(t) for t in texts]
    assert rewards == [rlino_half.parity_reward(t) for t in texts]
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


# ---------------------------------------------------------------- case (c) and its options


def test_gsm8k_case_options(bench: ModuleType) -> None:
    args = bench.parse_args(["--case", "gsm8k", "--quick", "--prompts", "1", "--packing", "prefix"])
    case = bench.with_overrides(bench.CASES["gsm8k"], args)
    assert (case.prompts, case.samples, case.new_tokens) == (1, 8, 256)
    assert (case.task, case.forced, case.model, case.trl_micro_batch) == (
        "gsm8k",
        False,
        "smollm2",
        8,
    )
    assert (case.goal_speedup, case.goal_rss) == (3.0, 0.3)
    assert args.packing == "prefix" and "--packing=prefix" in bench.worker_flags(args)
    assert "--prompts=1" in bench.worker_flags(args)
    all_rows = bench.parse_args(["--case", "gsm8k", "--quick", "--trl-micro-batch", "0"])
    assert bench.with_overrides(bench.CASES["gsm8k"], all_rows).trl_micro_batch == 0
    assert bench.with_overrides(bench.CASES["smollm2"], args).trl_micro_batch == 0  # P*G rows
    assert bench.CASES["tiny"].forced and bench.CASES["tiny"].model == "tiny"
    with pytest.raises(SystemExit):
        bench.parse_args(["--packing", "tree"])


def test_summary_carries_tokens_and_per_token_ratio(bench: ModuleType) -> None:
    raw = {
        "iter_s": [9.0, 4.0, 6.0],
        "peak_rss_gb": 2.0,
        "reward_mean": [0.1, 0.2, 0.3],
        "sampled_tokens": [999, 100, 150],
        "trained_tokens": [5, 300, 400],
        "completion_len_mean": [99.0, 12.5, 18.75],
    }
    s = bench.summarise(raw, warmup=1)
    assert s["sampled_tokens"] == [100, 150] and s["trained_tokens"] == [300, 400]
    assert s["completion_len_mean"] == [12.5, 18.75]
    assert s["s_per_sampled_token"] == pytest.approx(10.0 / 250)
    assert s["generate_s"] is None and s["update_tokens_run"] is None
    trl = bench.summarise({**raw, "iter_s": [1.0, 30.0, 30.0], "sampled_tokens": [1, 200, 200]}, 1)
    assert trl["s_per_sampled_token"] == pytest.approx(60.0 / 400)
    # per iteration TRL is 30 / 5 = 6x slower; per sampled token 0.15 / 0.04 = 3.75x
    assert bench.per_token_speedup(s, trl) == pytest.approx(3.75)
    assert bench.per_token_speedup(s, bench.summarise({**raw, "sampled_tokens": None}, 1)) is None


def test_update_rows_for_the_phase_shape_rate(bench: ModuleType) -> None:
    case = bench.CASES["gsm8k"]
    summary = {"update_tokens_run": [3000, 0, 900], "micro_batches": [3, 0, 1]}
    assert bench.update_rows(summary, case) == 950  # median of 1000 and 900 tokens per pass
    assert bench.update_rows({"update_tokens_run": [0], "micro_batches": [0]}, case) == 1024
    assert bench.update_rows({}, bench.CASES["tiny"]) == 8 * 8 * 128  # all rows in one pass


# ---------------------------------------------------------------- bench_util arithmetic


@pytest.mark.parametrize("tied", [True, False])
def test_weight_shapes_and_flop_params_of_a_small_llama(util: ModuleType, tied: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim 8: k and v project 32 -> 16
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    assert util.weight_shapes(model) == {
        (16, 32): 4,  # k, v
        (32, 32): 4,  # q, o
        (32, 64): 2,  # down
        (64, 32): 4,  # gate, up
        (100, 32): 1,  # lm head, tied or not
    }
    # per layer: q 1024 + k 512 + v 512 + o 1024 + gate 2048 + up 2048 + down 2048 + 2 norms 64
    # = 9280; 2 layers + final norm 32 = 18592; + lm head 3200; the input embedding left out
    assert util.flop_params(model) == 18592 + 3200 == 21792


def test_phase_products_and_mix_rate(util: ModuleType) -> None:
    P = util.Product
    assert util.phase_products((3, 2), 4, "decode") == [P("forward", 4, 2, 3)]
    update = util.phase_products((3, 2), 4, "update")
    assert [p.op for p in update] == ["forward", "grad_input", "grad_weight"]
    assert {p.flops for p in update} == {2 * 4 * 2 * 3}  # 48 each, whatever the product
    shapes = {(3, 2): 2, (5, 2): 1}
    seconds = {P("forward", 4, 2, 3): 2.0, P("forward", 4, 2, 5): 1.0}
    # (2 x 48 + 80) FLOPs in (2 x 2.0 + 1.0) s
    assert util.mix_rate(shapes, 4, "decode", seconds) == pytest.approx(176 / 5)
    seconds = {p: 1.0 for p in util.phase_products((3, 2), 4, "update")}
    seconds |= {p: 2.0 for p in util.phase_products((5, 2), 4, "update")}
    # (2 x 3 x 48 + 3 x 80) FLOPs in (2 x 3 x 1.0 + 3 x 2.0) s
    assert util.mix_rate(shapes, 4, "update", seconds) == pytest.approx(528 / 12)


def test_phase_utilisation(util: ModuleType) -> None:
    # sampling: 2 x 100 params x 50 tokens / 2 s = 5000 FLOP/s
    u = util.phase_utilisation("decode", 100, 50, 2.0, 10_000.0, 20_000.0)
    assert u == pytest.approx({"model_flop_per_s": 5000, "of_square": 0.5, "of_phase_shapes": 0.25})
    # update: 6 x 100 x 50 / 2 = 15000 FLOP/s
    u = util.phase_utilisation("update", 100, 50, 2.0, 10_000.0, 20_000.0)
    assert u == pytest.approx(
        {"model_flop_per_s": 15000, "of_square": 1.5, "of_phase_shapes": 0.75}
    )
    assert util.phase_utilisation("update", 100, 0, 0.0, 1.0, 1.0)["of_square"] is None


def test_side_utilisation(bench: ModuleType) -> None:
    rates = {
        "flop_params": 100,
        "square_flop_per_s": 10_000.0,
        "decode_flop_per_s": 2_000.0,
        "update_flop_per_s": 20_000.0,
    }
    trl = {"iter_s": [5.0, 7.0], "generate_s": [1.0, 1.0], "sampled_tokens": [10, 10]}
    trl["trained_tokens"] = [50, 50]
    u = bench.utilisation(rates, trl)
    assert u["decode"]["model_flop_per_s"] == pytest.approx(2 * 100 * 20 / 2.0)  # 2000
    assert u["decode"]["of_phase_shapes"] == pytest.approx(1.0)
    assert u["update"]["seconds"] == pytest.approx(10.0)  # step time less generate
    assert u["update"]["of_square"] == pytest.approx(6 * 100 * 100 / 10.0 / 10_000)
    assert "update_run" not in u
    rlino = {**trl, "generate_s": None, "rollout_s": [0.5, 0.5], "update_s": [2.0, 2.0]}
    rlino["update_tokens_run"] = [25, 25]
    u = bench.utilisation(rates, rlino)
    assert u["update"]["model_flop_per_s"] == pytest.approx(6 * 100 * 100 / 4.0)
    assert u["update_run"]["model_flop_per_s"] == pytest.approx(6 * 100 * 50 / 4.0)
    assert bench.utilisation(rates, None) is None
    assert bench.utilisation(rates, {**trl, "generate_s": None}) is None  # sampling not timed


def test_measure_and_cli_on_a_tiny_model(
    util: ModuleType, tiny_random_model_dir: Path, capsys
) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        out = util.main(
            [
                *("--model", str(tiny_random_model_dir), "--rows", "4", "--update-rows", "16"),
                *("--seconds", "0.02", "--runs", "2", "--threads", "1"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert (out["dtype"], out["decode_rows"], out["update_rows"], out["threads"]) == (
        "fp32",
        4,
        16,
        1,
    )
    assert out["square_flop_per_s"] > 0 and out["decode_flop_per_s"] > 0
    assert out["update_flop_per_s"] > 0
    ops = [(p["op"], p["rows"]) for p in out["products"]]
    shapes = len(out["weight_shapes"])
    assert ops.count(("forward", 4)) == shapes and ops.count(("grad_weight", 16)) == shapes
    assert ops[0] == ("square", 2048)


# ---------------------------------------------------------------- the TRL half's bookkeeping


def test_trl_generate_calls_grouped_per_step(trl_half: ModuleType) -> None:
    calls = [(8, 1.0, [5] * 8), (8, 2.0, [5] * 8)]
    assert trl_half.per_step_generation(calls, 8, 2) == [(1.0, [5] * 8), (2.0, [5] * 8)]
    halves = [(4, 0.5, [5] * 4), (4, 0.25, None)]
    assert trl_half.per_step_generation(halves, 8, 1) == [(0.75, None)]  # lengths unknown
    assert trl_half.per_step_generation(calls, 8, 3) is None  # a step without a generate call
    assert trl_half.per_step_generation([(12, 1.0, None)], 8, 1) is None
    assert trl_half.per_step_generation([], 8, 2) is None


def test_trl_step_series(trl_half: ModuleType, bench: ModuleType) -> None:
    from dataclasses import replace

    case = replace(bench.CASES["gsm8k"], prompts=2, samples=2)
    lengths = [3, 4, 5, 6, 1, 1, 1, 1]  # two steps of P*G = 4 completions
    calls = [(4, 1.5, [10, 10, 20, 20]), (4, 0.5, [20, 10, 20, 10])]
    out = trl_half.step_series(case, [3.0, 2.0], [0.0, 0.5], lengths, calls, [10, 20])
    assert out["sampled_tokens"] == [18, 4]
    assert out["trained_tokens"] == [60 + 18, 60 + 4]  # every row's prompt and completion
    assert out["generate_s"] == [1.5, 0.5]
    assert out["trained_rows"] == [4, 4] and out["completion_len_mean"] == [4.5, 1.0]
    out = trl_half.step_series(case, [3.0, 2.0], [0.0, 0.5], lengths, [], [10, 20])
    assert out["generate_s"] is None and out["trained_tokens"] == [78, 64]  # from the prompts
    with pytest.raises(SystemExit):  # generate got other prompts than the shared ones
        trl_half.step_series(case, [3.0, 2.0], [0.0, 0.5], lengths, calls, [10, 21])


@pytest.mark.slow
def test_gsm8k_case_rlino_only_quick_run(smollm2_gguf: tuple[Path, str], tmp_path: Path) -> None:
    """Case (c) end to end on the rlino side, tiny: SmolLM2 samples to EOS (16-token cap) on one
    GSM8K test problem, is graded by the verifier, and the utilisation is measured and reported."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--rlino-only", "--case", "gsm8k"]
    cmd += ["--prompts", "1", "--new-tokens", "16", "--warmup", "0", "--threads", "1"]
    cmd += ["--utilisation", "--util-seconds", "0.05", "--work-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (case,) = json.loads(proc.stdout.strip().splitlines()[-1])["cases"]
    assert (case["name"], case["prompts"], case["samples"], case["new_tokens"]) == (
        "gsm8k",
        1,
        8,
        16,
    )
    assert (case["forced"], case["packing"], case["trl"]) == (False, "none", None)
    r = case["rlino"]
    assert len(r["prompt_tokens"]) == 1 and r["prompt_tokens"][0] > 50  # system + question
    assert 8 <= r["sampled_tokens"][0] <= 8 * 16
    assert r["completion_len_mean"][0] == pytest.approx(r["sampled_tokens"][0] / 8, abs=1e-3)
    assert r["trained_rows"][0] in (0, 8)  # one group: all-equal rewards train no row
    assert r["reward_mean"] * 8 == pytest.approx(round(r["reward_mean"] * 8))  # 0/1 verifier
    assert r["rollout_s"][0] > 0 and r["update_s"][0] > 0
    u = case["utilisation"]
    assert u["rates"]["decode_rows"] == 8 and u["rates"]["flop_params"] == 134515008
    assert u["rlino"]["decode"]["tokens"] == r["sampled_tokens"][0]
    assert 0 < u["rlino"]["decode"]["of_square"] < 5
    assert u["trl"] is None
    assert "rlino utilisation: decode" in proc.stdout
