"""`rlino train` config resolution: `--method` on a preset keeps what applies; `--print-config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from rlino import cli

PRESET = "qwen2.5-0.5-gsm8k"
GPU_PRESETS = (
    "qwen2.5-0.5-gsm8k",
    "qwen2.5-1.5-gsm8k",
    "qwen2.5-0.5-countdown",
    "qwen2.5-1.5-countdown",
    "llama3.2-1b-instruct-gsm8k",
)


def invoke(*args: str) -> Any:
    """`rlino train ARGS` in-process; the result has .exit_code, .stdout and .stderr apart."""
    return CliRunner().invoke(cli.app, ["train", *args])


def printed(*args: str) -> tuple[dict[str, Any], list[str]]:
    """The config `rlino train ARGS --print-config` prints, and its stderr lines."""
    result = invoke(*args, "--print-config")
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict), result.stdout
    return config, result.stderr.splitlines()


def test_method_grpo_keeps_the_presets_method_settings() -> None:
    config, notes = printed("-c", PRESET, "--method", "grpo")
    method = config["method"]
    assert method["name"] == "grpo"
    assert method["beta"] == 0.001  # was 0.0: --method replaced the whole block
    assert (method["clip_eps"], method["mu"]) == (0.2, 1)
    assert (method["aggregation"], method["surrogate"]) == ("token-mean", "clipped")
    assert (method["std"], method["std_eps"], method["weight_on"]) == ("sample", 1e-6, "reward")
    assert notes == []


def test_print_config_is_the_saved_config_and_nothing_else(tmp_path: Path) -> None:
    from rlino.config import load_config, save_config

    result = invoke("-c", PRESET, "--method", "grpo", "--print-config")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith("model:\n")
    # exactly what the run's config.yaml would hold (same keys, same order, same values)
    save_config(load_config(PRESET), tmp_path / "config.yaml")
    assert result.stdout == (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_presets_hold_the_authors_settings(preset: str) -> None:
    config, _ = printed("-c", preset, "--method", "grpo")
    method, rollout, optim = config["method"], config["rollout"], config["optim"]
    assert method == {
        **method,
        "beta": 0.001,
        "clip_eps": 0.2,
        "mu": 1,
        "aggregation": "token-mean",
        "surrogate": "clipped",
        "weight_on": "reward",
        "std": "sample",
        "std_eps": 1e-6,
    }
    assert (rollout["samples_per_prompt"], rollout["prompts_per_iter"]) == (5, 256)
    assert (rollout["max_new_tokens"], rollout["backend"], rollout["on_truncation"]) == (
        1024,
        "vllm",
        "keep",
    )
    assert (optim["lr"], optim["schedule"], optim["grad_clip"]) == (1e-6, "constant", 1.0)
    # 4 optimiser minibatches of 64 prompts per rollout batch of 256
    assert (
        rollout["prompts_per_iter"] * rollout["samples_per_prompt"] == 4 * optim["minibatch_size"]
    )
    assert config["model"]["dtype"] == "bf16"
    if config["task"]["name"] == "gsm8k":
        assert config["task"]["options"]["extraction"] == "strict"
        assert "path" not in config["task"]["options"]  # the shipped copy


def test_method_fisft_drops_beta_with_a_note_and_keeps_the_rest() -> None:
    config, notes = printed("-c", PRESET, "--method", "fisft+-")
    method = config["method"]
    assert method["name"] == "fisft+-"
    assert method["beta"] == 0.0
    assert (method["clip_eps"], method["mu"]) == (0.2, 1)
    assert (method["aggregation"], method["surrogate"]) == ("token-mean", "clipped")
    beta_notes = [n for n in notes if "method.beta=0.001" in n]
    assert len(beta_notes) == 1 and "reference model" in beta_notes[0], notes
    assert all(n.startswith("note: --method fisft+- drops method.") for n in notes), notes
    # one line per dropped setting, none for what was kept
    assert not any(k in n for n in notes for k in ("clip_eps", "aggregation", "surrogate", "mu"))


def test_method_raft_keeps_aggregation() -> None:
    config, _ = printed("-c", PRESET, "--method", "raft")
    assert config["method"]["name"] == "raft"
    assert config["method"]["aggregation"] == "token-mean"
    assert config["method"]["surrogate"] == "clipped"


def test_a_method_preset_that_fixes_a_setting_says_so() -> None:
    from rlino.methods import MethodParams, resolve

    config, notes = printed("-c", PRESET, "--method", "dr-grpo")
    assert config["method"]["beta"] == 0.001  # dr-grpo has a reference model: kept
    assert config["method"]["aggregation"] != "token-mean"
    assert resolve(MethodParams(**config["method"]))[1].aggregation == "constant"
    assert any("method.aggregation=token-mean" in n and "dr-grpo fixes" in n for n in notes), notes


def test_tiny_preset_method_switch_drops_its_beta() -> None:
    config, notes = printed("-c", "tiny-countdown-grpo", "--method", "fisft+")
    assert (config["method"]["name"], config["method"]["beta"]) == ("fisft+", 0.0)
    assert len(notes) == 1 and "method.beta=0.04" in notes[0], notes


def test_explicit_set_wins_over_the_preset_and_method() -> None:
    config, notes = printed("-c", PRESET, "--set", "method.beta=0.002", "--method", "grpo")
    assert config["method"]["beta"] == 0.002
    assert notes == []
    # a dropped setting set again explicitly is not reported as dropped
    config, notes = printed("-c", PRESET, "--method", "fisft+-", "--set", "method.beta=0")
    assert config["method"]["beta"] == 0.0
    assert not any("method.beta" in n for n in notes), notes
    config, _ = printed("-c", PRESET, "--method", "raft", "--set", "method.aggregation=seq-mean")
    assert config["method"]["aggregation"] == "seq-mean"


def test_unknown_method_exits_2_with_one_line() -> None:
    result = invoke("-c", PRESET, "--method", "ppo", "--print-config")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown method 'ppo'"), result.stderr
    assert result.stdout == ""


def test_typo_in_a_presets_method_block_still_fails(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("method:\n  name: grpo\n  betta: 0.1\n")
    result = invoke("-c", str(preset), "--method", "fisft+", "--print-config")
    assert result.exit_code == 2
    assert "unknown config key 'method.betta'" in result.stderr


def test_print_config_with_a_bad_value_exits_2_with_one_line() -> None:
    result = invoke("-c", PRESET, "--method", "grpo", "--set", "optim.lr=-1", "--print-config")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "error: optim.lr must be > 0 (got -1.0)", result.stderr
    assert result.stdout == ""


def test_print_config_loads_no_model_and_trains_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import rlino.policy
    import rlino.train

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("--print-config must not load a model or train")

    monkeypatch.setattr(rlino.policy, "load_policy", refuse)
    monkeypatch.setattr(rlino.train, "train", refuse)
    monkeypatch.chdir(tmp_path)
    for args in (("-c", PRESET, "--method", "grpo"), ("--method", "fisft+"), ()):
        result = invoke(*args, "--print-config")
        assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []  # no run directory either


def test_print_config_in_a_fresh_process_imports_no_torch() -> None:
    """No torch, no model, no device check: a cuda/vllm preset prints on a CPU-only machine."""
    code = (
        "import sys, time\n"
        "from rlino.cli import app\n"
        "t = time.process_time()\n"
        "try:\n"
        f"    app(['train', '-c', {PRESET!r}, '--method', 'grpo', '--print-config'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('#', 'torch' in sys.modules, time.process_time() - t, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["method"]["beta"] == 0.001
    _, torch_loaded, cpu = proc.stderr.split()
    assert torch_loaded == "False"
    assert float(cpu) < 1.0


def test_print_config_with_resume_shows_the_runs_config_and_overrides(tmp_path: Path) -> None:
    from rlino.config import load_config, save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("tiny-countdown-grpo"), run / "config.yaml")
    config, notes = printed("--resume", str(run), "--iterations", "7", "--set", "optim.lr=1e-4")
    assert (config["iterations"], config["optim"]["lr"]) == (7, 1e-4)
    assert (config["method"]["name"], config["method"]["beta"]) == ("grpo", 0.04)
    assert notes == []
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
