"""The built-in tiny base model: corpus, tokenizer, `rlino pretrain`, and the shipped model dir."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlino import resolve, tiny
from rlino.tasks import get_task
from rlino.tiny_corpus import TraceStyle, all_tries, trace
from rlino.verify.countdown import check_equation, evaluate_expression

SHIPPED = Path(tiny.__file__).parent / "assets" / "tiny-countdown"


@pytest.fixture(scope="module")
def task():
    return get_task("countdown", **tiny.DEFAULT_TASK_OPTIONS)


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlino", *args], capture_output=True, text=True, timeout=timeout
    )


def test_every_try_is_right_and_uses_each_number_once() -> None:
    tries = all_tries([3, 5, 2])
    assert len({t.steps for t in tries}) == len(tries)
    assert any(t.expr == "(3 + 5) * 2" and t.value == 16 for t in tries)
    for t in tries:
        assert check_equation(t.expr, [3, 5, 2], t.value), t.expr


def test_trace_is_well_formed_and_answers_one_of_its_tries() -> None:
    import random

    rng = random.Random(0)
    for _ in range(50):
        text = trace([4, 7, 9], 19, rng, TraceStyle())
        think, _, answer = text.partition("</think> <answer> ")
        assert answer.endswith(" </answer>")
        expr = answer.removesuffix(" </answer>")
        tries = {t.expr: t for t in all_tries([4, 7, 9])}
        assert tries[expr].text() in think


def test_trace_policy_knobs_work() -> None:
    import random

    always = TraceStyle(hit=1.0, stop_on_hit=1.0, pick_hit=1.0)
    text = trace([3, 5, 2], 16, random.Random(1), always)
    answer = text.split("<answer> ")[1].removesuffix(" </answer>")
    assert evaluate_expression(answer) == 16
    assert text.count(".") == 1  # stopped at the first (hitting) try


def test_corpus_is_deterministic_and_never_uses_test_instances(task) -> None:
    a = tiny.corpus(task, 40, seed=3)
    assert a == tiny.corpus(task, 40, seed=3)
    assert a != tiny.corpus(task, 40, seed=4)
    test_prompts = {task.prompt(ex, "r1") for ex in task.examples("test")}
    assert not test_prompts & {p for p, _ in tiny.corpus(task, 300, seed=0)}
    assert all(p.endswith("<think>") for p, _ in a)


def test_tokenizer_is_cheap_and_lossless(task) -> None:
    pairs = tiny.corpus(task, 200, seed=0)
    tok = tiny.build_tokenizer([p for p, _ in pairs])
    for prompt, completion in pairs[:20]:
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(completion, add_special_tokens=False)["input_ids"]
        assert tok(prompt + completion, add_special_tokens=False)["input_ids"] == p_ids + c_ids
        assert tok.decode(p_ids + c_ids) == prompt + completion
        assert len(p_ids) == 9  # 3 boilerplate tokens, 3 numbers, 2 commas, the target
        assert tok.unk_token_id not in p_ids + c_ids
    for number in ("7", "123", "999"):
        assert tok.tokenize(number) == [number]
    assert tok.tokenize(" 7 * 12 = 84.") == [" ", "7", " * ", "12", " = ", "84", "."]
    assert (
        tok.decode(tok("1234 Apples?\n", add_special_tokens=False)["input_ids"]) == "1234 Apples?\n"
    )


def test_task_settings(tmp_path: Path) -> None:
    assert resolve.task_settings(tmp_path) is None
    (tmp_path / resolve.TASK_FILE).write_text(
        '{"task": "countdown", "template": "r1", "options": {}}'
    )
    assert resolve.task_settings(tmp_path) == {"task": "countdown", "template": "r1", "options": {}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nosuch"], "no tiny-model corpus for task 'nosuch'"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--task-opt", "max_number=0"], "min_number <= max_number"),
    ],
)
def test_bad_pretrain_args_exit_2_with_one_line(tmp_path: Path, args, message) -> None:
    result = _run("pretrain", "--out", str(tmp_path / "m"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "m").exists()


# A script run in a fresh interpreter: plain transformers only, rlino must stay unimported.
LOAD_AND_SAMPLE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=120, do_sample=False)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "rlino" not in sys.modules
    print(json.dumps(texts))
    """
)


def _load_and_sample(model_dir: Path, prompts: list[str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_SAMPLE, str(model_dir), json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_pretrain_writes_a_plain_hf_model_dir(tmp_path: Path, task) -> None:
    out = tmp_path / "tiny"
    result = _run("pretrain", "--out", str(out), "--steps", "3", "--batch-size", "8", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "saved" in result.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", resolve.TASK_FILE):
        assert (out / name).is_file()
    settings = resolve.task_settings(out)
    assert settings["task"] == "countdown" and settings["template"] == "r1"
    assert settings["options"]["max_number"] == tiny.DEFAULT_TASK_OPTIONS["max_number"]
    texts = _load_and_sample(out, [task.prompt(ex, "r1") for ex in task.examples("test")[:2]])
    assert len(texts) == 2
    again = tmp_path / "again"
    result = _run("pretrain", "--out", str(again), "--steps", "3", "--batch-size", "8", "--quiet")
    assert result.returncode == 0, result.stderr
    weights = (out / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights  # same seed, same weights


@pytest.mark.slow
def test_shipped_model_answers_in_format_without_rlino() -> None:
    settings = resolve.task_settings(SHIPPED)
    assert settings is not None and settings["task"] == "countdown"
    shipped_task = get_task("countdown", **settings["options"])
    examples = shipped_task.examples("test")[:6]
    texts = _load_and_sample(SHIPPED, [shipped_task.prompt(ex, "r1") for ex in examples])
    for text, example in zip(texts, examples, strict=True):
        assert "</think> <answer>" in text and text.rstrip().endswith("</answer>"), text
        assert shipped_task.score(text, example).format_ok


def test_shipped_tokenizer_round_trips_prompt_and_completion(task) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHIPPED)
    prompt = task.prompt(task.examples("test")[0], "r1")
    text = prompt + " 3 + 5 = 8, 8 * 2 = 16.</think> <answer> (3 + 5) * 2 </answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token is not None and tok.pad_token is not None
    assert tok.convert_tokens_to_ids("</answer>") != tok.unk_token_id
    # AutoTokenizer must honour tokenizer.json as saved (no architecture-specific pre-tokenizer).
    assert tok.tokenize("[12, 40]") == ["[", "12", ", ", "40", "]"]
