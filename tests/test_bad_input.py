"""Bad input never produces a traceback: one `error: ...` line, exit code 2, no run directory.

Each test feeds one kind of bad input through the CLI (malformed data lines, broken model
directories, a chat template the tokenizer lacks, bad `--set`s); a property-based test throws
random `--set key=value` combinations at config resolution and accepts only a valid config or a
one-line UserError.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rlino import cli
from rlino.cli_train import resolve_train_config
from rlino.config import TrainConfig, load_config, save_config, to_dict
from rlino.errors import UserError

TINY_RUN = [
    "--iterations", "1", "--quiet", "--device", "cpu",
    "--set", "rollout.prompts_per_iter=2", "--set", "rollout.samples_per_prompt=2",
    "--set", "rollout.max_new_tokens=4", "--set", "eval.num_examples=2",
    "--set", "tensorboard=false", "--set", "threads=1",
]  # fmt: skip


def invoke(*args: str) -> Result:
    """Run `rlino ARGS` in-process with stderr kept apart from stdout."""
    return CliRunner().invoke(cli.app, list(args))


def assert_one_line_error(result: Result, *needles: str) -> None:
    """Exit code 2, no traceback, and exactly one `error: ...` line on stderr naming `needles`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------ in a real process


def test_real_process_prints_one_line_and_exit_2(
    tiny_random_model_dir: Path, tmp_path: Path
) -> None:
    """What a user sees, loggers and warnings of transformers included: stderr is one line."""
    bad = tmp_path / "BAD.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": oops\n')
    broken = tmp_path / "model"
    shutil.copytree(tiny_random_model_dir, broken)
    (broken / "model.safetensors").unlink()
    run = tmp_path / "run"
    cases = [
        (["eval", "--task", "gsm8k", "--model", str(tiny_random_model_dir), "--data", str(bad)],
         f"{bad}:2: not valid JSON"),
        (["train", "--task", "countdown", "--data", str(bad), "--out", str(run)],
         f"{bad}:2: not valid JSON"),
        (["train", "--model", str(broken), "--out", str(run)], "no weights"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, needle in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "rlino", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
        assert needle in proc.stderr
        assert not run.exists()


# ------------------------------------------------------------------ malformed data lines


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"question": "q", "answer": "#### 1"}\n{"question": oops\n', ":2: not valid JSON"),
        ('{"question": "q", "answer": "#### 1"}\n[1, 2]\n', ":2: expected a JSON object"),
        ('{"question": "q", "answer": NaN}\n', ":1: not valid JSON"),
        ('{"question": "q", "answer": 1e400}\n', ":1: number out of range"),
    ],
)
def test_malformed_gsm8k_line_names_file_and_line(
    tiny_random_model_dir: Path, tmp_path: Path, text: str, needle: str
) -> None:
    bad = tmp_path / "BAD.jsonl"
    bad.write_text(text)
    result = invoke(
        "eval", "--model", str(tiny_random_model_dir), "--task", "gsm8k", "--data", str(bad),
        "--limit", "1", "--max-new-tokens", "2", "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(result, str(bad) + needle)


def test_bad_bytes_name_their_line(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "BAD.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff"}\n')
    result = invoke(
        "eval", "--model", str(tiny_random_model_dir), "--task", "gsm8k", "--data", str(bad),
        "--limit", "1", "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(result, f"{bad}:2: not UTF-8 text")


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("BAD.jsonl", '{"numbers": [1, 2], "target": 3}\n{bad\n', "BAD.jsonl:2: not valid JSON"),
        ("BAD.jsonl", '{"numbers": [1e400, 2], "target": 3}\n', "BAD.jsonl:1: number out of"),
        ("BAD.jsonl", '{"numbers": "abc", "target": 3}\n', "example 0 from"),
        ("BAD.parquet", "PAR1 not really parquet", "BAD.parquet: not a readable parquet file"),
    ],
)
def test_malformed_countdown_data_stops_train_before_the_run_dir(
    tmp_path: Path, name: str, content: str, needle: str
) -> None:
    bad = tmp_path / name
    bad.write_text(content)
    run = tmp_path / "run"
    result = invoke(
        "train", "--task", "countdown", "--data", str(bad), "--out", str(run), *TINY_RUN
    )
    assert_one_line_error(result, needle)
    assert not run.exists()


# ------------------------------------------------------------------ broken model directories


@pytest.mark.parametrize(
    ("remove", "needle"),
    [
        (["model.safetensors"], "no weights"),
        (["tokenizer.json", "tokenizer_config.json"], "no tokenizer files"),
        (["config.json"], "no config.json"),
    ],
)
def test_model_dir_missing_files(
    tiny_random_model_dir: Path, tmp_path: Path, remove: list[str], needle: str
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_random_model_dir, broken)
    for name in remove:
        (broken / name).unlink()
    run = tmp_path / "run"
    result = invoke(
        "train", "--model", str(broken), "--task", "countdown", "--out", str(run), *TINY_RUN
    )
    assert_one_line_error(result, str(broken), needle)
    assert not run.exists()
    result = invoke(
        "eval", "--model", str(broken), "--task", "countdown", "--limit", "1", "--device", "cpu"
    )
    assert_one_line_error(result, str(broken), needle)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("model.safetensors", b"garbage", "model.safetensors"),
        ("config.json", b"{", "config.json"),
        ("tokenizer.json", b"{", "tokenizer"),
    ],
)
def test_model_dir_with_corrupt_file(
    tiny_random_model_dir: Path, tmp_path: Path, name: str, content: bytes, needle: str
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_random_model_dir, broken)
    (broken / name).write_bytes(content)
    run = tmp_path / "run"
    result = invoke(
        "train", "--model", str(broken), "--task", "countdown", "--out", str(run), *TINY_RUN
    )
    assert_one_line_error(result, str(broken), needle)
    assert not run.exists()


def test_chat_template_without_one_in_the_tokenizer(
    tiny_random_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    model = str(tiny_random_model_dir)
    result = invoke(
        "train", "--model", model, "--task", "countdown", "--template", "chat", "--out", str(run),
        *TINY_RUN,
    )  # fmt: skip
    assert_one_line_error(result, "no chat template", model)
    assert not run.exists()
    result = invoke(
        "eval", "--model", model, "--task", "countdown", "--template", "chat", "--limit", "1",
        "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(result, "no chat template", model)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke("train", "--out", str(run), "--set", "rollout.backend=vllm", *TINY_RUN)
    assert_one_line_error(result, "needs the vllm package")
    assert not run.exists()
    result = invoke("eval", "--task", "countdown", "--backend", "vllm", "--limit", "1")
    assert_one_line_error(result, "needs the vllm package")


def test_unknown_eval_backend() -> None:
    result = invoke("eval", "--task", "countdown", "--backend", "nosuch", "--limit", "1")
    assert_one_line_error(result, "unknown rollout backend 'nosuch'")


# ------------------------------------------------------------------ bad --set values


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("optim.nosuch=1", "unknown config key 'optim.nosuch'"),
        ("nosuch.deeper.key=1", "unknown config key 'nosuch'"),
        ("optim=3", "optim must be a mapping"),
        ("rollout.samples_per_prompt=many", "rollout.samples_per_prompt must be an integer"),
        ("rollout.samples_per_prompt=2.5", "rollout.samples_per_prompt must be an integer"),
        ("rollout.samples_per_prompt=0", "rollout.samples_per_prompt must be >= 1"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("method.beta=nan", "method.beta must be a finite number"),
        ("optim.lr=" + "9" * 400, "optim.lr must be a finite number"),
        ("iterations=" + "9" * 5000, "iterations must be an integer"),
        ("iterations=" + "9" * 30, "iterations must be an integer of at most 64 bits"),
        ("seed=-1", "seed must be in [0, 2**32)"),
        ("threads=100000", "threads must be in [0, 4096]"),
        ("iterations=", "iterations must be an integer, got None"),
        ("model.dtype=[1,", "model.dtype must be auto"),
        ("model.device=cuda:x", "model.device must be auto, cpu or cuda[:N]"),
        ("task.options={a: !!binary aGk=}", "task.options must hold plain values"),
        ("tensorboard=maybe", "tensorboard must be true or false"),
    ],
)
def test_bad_set_is_one_line_and_leaves_no_run_dir(
    tmp_path: Path, setting: str, needle: str
) -> None:
    run = tmp_path / "run"
    result = invoke("train", "--out", str(run), "--set", setting, "--quiet")
    assert_one_line_error(result, needle)
    assert not run.exists()


# ------------------------------------------------------------------ property: random --set


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of `cls`, recursing into nested config dataclasses."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _leaf_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


LEAF_KEYS = _leaf_keys(TrainConfig)
SECTION_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]

YAML_ODDITIES = [
    "", "~", "null", "{", "}", "[1,", "[1, 2]", "{a: 1}", "!!python/object:os.system", "!!binary aGk=",
    "!!set {a, b}", "2001-12-14", ".inf", "-.inf", ".nan", "nan", "inf", "1e400", "-0", "0x10",
    "0o17", "1_000", "yes", "on", "true", "'quoted'", '"\\u0000"', "&a [*a]", "&a {x: *a}",
    "*undefined", "@", "`", "%", "---", "...", "- 1", "a: b: c", "? x", "|\n  text", "1e-3",
    "9" * 5000, "-" + "9" * 30, "1." + "0" * 400, "\x00", "ümlaut ☃ 𝄞", "[[[[[[[[[[[[[[[[[[[[",
    "[" * 2000, "cuda:1", "cuda:x", "cpu", "bf16", "grpo", "fisft+-", "raft", "token-mean",
]  # fmt: skip

junk_values = st.one_of(
    st.sampled_from(YAML_ODDITIES),
    st.text(max_size=40),
    st.text(min_size=2000, max_size=3000, alphabet="ab9.-"),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.integers(-5, 5), max_size=3).map(str),
)
junk_keys = st.one_of(
    st.sampled_from(LEAF_KEYS),
    st.sampled_from(SECTION_KEYS),
    st.lists(
        st.sampled_from([*SECTION_KEYS, "x", "", "options", "name"]), min_size=1, max_size=4
    ).map(".".join),
    st.text(max_size=20),
)
settings_lists = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(LEAF_KEYS), junk_values).map("=".join),
        st.tuples(junk_keys, junk_values).map("=".join),
        st.text(max_size=30),  # not even key=value
    ),
    max_size=4,
)


def _check_outcome(resolve: typing.Callable[[], object], tmp_path: Path) -> None:
    """A valid TrainConfig that round-trips through config.yaml, or a one-line UserError."""
    try:
        config = resolve()
    except UserError as e:
        message = str(e)
        assert len(message.splitlines()) == 1, repr(message)  # \n, \r, \x1c, \u2028, ...
        return
    assert isinstance(config, TrainConfig)
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert to_dict(load_config(str(path))) == to_dict(config)
    assert yaml.safe_load(path.read_text()) == to_dict(config)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(items=settings_lists)
def test_random_sets_give_a_config_or_one_line_error(tmp_path: Path, items: list[str]) -> None:
    _check_outcome(lambda: load_config(None, items), tmp_path)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    items=settings_lists,
    method=st.one_of(st.none(), st.sampled_from(["grpo", "fisft+", "raft", "nosuch", ""])),
    preset=st.sampled_from([None, "tiny-countdown", "nosuch-preset"]),
)
def test_random_sets_through_train_resolution(
    tmp_path: Path, items: list[str], method: str | None, preset: str | None
) -> None:
    def resolve() -> TrainConfig:
        config, notes = resolve_train_config(
            config=preset, method=method, items=items, resume=None, run_settings=()
        )
        assert all("\n" not in note for note in notes)
        return config

    _check_outcome(resolve, tmp_path)
