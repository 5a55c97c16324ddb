"""The built-in tiny base model: corpus, tokenizer, `rlino pretrain`, and the shipped model dir."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlino import resolve, tiny, tiny_bases
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
        (["--recipe", "countdown-huge"], "unknown tiny base 'countdown-huge'; known: countdown,"),
        (["--style", "hat=0.5"], "unknown --style key(s) hat"),
        (["--style", "hit=1.5"], "style hit must be in [0, 1], got 1.5"),
        (["--eval-examples", "-1"], "--eval-examples must be >= 0"),
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
    small = ("--steps", "3", "--batch-size", "8", "--quiet", "--eval-examples", "2")
    result = _run("pretrain", "--out", str(out), *small)
    assert result.returncode == 0, result.stderr
    assert "saved" in result.stdout and "greedy pass@1 0.0%" in result.stdout
    names = ("config.json", "model.safetensors", "tokenizer.json", resolve.TASK_FILE)
    for name in (*names, tiny_bases.BASE_EVAL_FILE):
        assert (out / name).is_file()
    evals = json.loads((out / tiny_bases.BASE_EVAL_FILE).read_text())
    assert evals["eval_examples"] == 2 and evals["sampled_per_prompt"] == 8
    settings = resolve.task_settings(out)
    assert settings["task"] == "countdown" and settings["template"] == "r1"
    assert settings["options"]["max_number"] == tiny.DEFAULT_TASK_OPTIONS["max_number"]
    texts = _load_and_sample(out, [task.prompt(ex, "r1") for ex in task.examples("test")[:2]])
    assert len(texts) == 2
    again = tmp_path / "again"
    result = _run("pretrain", "--out", str(again), *small[:-2], "--eval-examples", "0")
    assert result.returncode == 0, result.stderr
    weights = (out / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights  # same seed, same weights
    assert not (again / tiny_bases.BASE_EVAL_FILE).exists()


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


# ---- bases of different strength ----


@pytest.mark.usefixtures("one_thread")  # pretraining sets torch threads: restore them
def test_pretrain_flags_on_a_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--recipe` with flags on top: the recipe's style plus --style is what trains and what
    rlino_task.json records; a changed recipe is not named as the recipe in base_eval.json."""
    out = tmp_path / "styled"
    tiny_bases.run_pretrain_command(
        out=str(out),
        recipe="countdown-weak",
        task="countdown",
        seed=0,
        steps=2,
        batch_size=4,
        lr=None,
        threads=1,
        style=["give_up=0.5"],
        task_opt=[],
        eval_examples=1,
        quiet=True,
    )
    assert "saved" in capsys.readouterr().out
    recorded = json.loads((out / resolve.TASK_FILE).read_text())["pretrain"]
    assert (recorded["style"]["hit"], recorded["style"]["give_up"]) == (0.15, 0.5)
    assert recorded["steps"] == 2
    evals = json.loads((out / tiny_bases.BASE_EVAL_FILE).read_text())
    assert evals["recipe"] is None and evals["eval_examples"] == 1


def test_recipes_are_the_shipped_defaults_plus_style_and_steps() -> None:
    assert tiny_bases.RECIPES["countdown"].config() == tiny.PretrainConfig()
    weak, strong = tiny_bases.RECIPES["countdown-weak"], tiny_bases.RECIPES["countdown-strong"]
    assert weak.config().style.hit < TraceStyle().hit < strong.config().style.hit
    assert strong.config().steps > tiny.PretrainConfig().steps
    dirs = {tiny_bases.base_dir(f"tiny:{name}") for name in tiny_bases.RECIPES}
    assert len(dirs) == len(tiny_bases.RECIPES)  # each recipe its own cache entry
    assert tiny_bases.recipe_name("tiny:countdown-weak") == "countdown-weak"


@pytest.fixture
def quick_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A 2-step recipe `tiny:test-quick`, a private cache and a 2-example base evaluation."""
    monkeypatch.setenv("RLINO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny_bases, "EVAL_EXAMPLES", 2)
    recipe = tiny_bases.BaseRecipe("test-quick", "two steps", TraceStyle(hit=0.9), steps=2)
    monkeypatch.setitem(tiny_bases.RECIPES, "test-quick", recipe)
    return "tiny:test-quick"


@pytest.mark.usefixtures("one_thread")  # pretraining sets torch threads: restore them
def test_a_base_is_built_once_then_cached(quick_recipe: str, tmp_path: Path) -> None:
    path = tiny_bases.ensure_base(quick_recipe)
    assert path.parent == tmp_path / "cache" / "bases" and path.name.startswith("test-quick-")
    evals = json.loads((path / tiny_bases.BASE_EVAL_FILE).read_text())
    assert evals["recipe"] == "test-quick" and evals["eval_examples"] == 2
    assert 0.0 <= evals["greedy_accuracy"] <= 1.0 and 0.0 <= evals["sampled_accuracy"] <= 1.0
    assert resolve.task_settings(path)["pretrain"]["style"]["hit"] == 0.9
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_bases.ensure_base(quick_recipe) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


@pytest.mark.usefixtures("one_thread")  # pretraining sets torch threads: restore them
def test_compare_builds_a_named_base_before_its_runs(quick_recipe: str, tmp_path: Path) -> None:
    from rlino.analysis.compare import run_compare, spec_from_dict

    spec = spec_from_dict(
        {
            "methods": ["grpo"],
            "train": {"model": {"path": quick_recipe}, "iterations": 1, "tensorboard": False},
        }
    )
    seen: list[str | None] = []

    def fake_train(config, run_dir, **kw):
        seen.append(config.model.path)
        run_dir.mkdir(parents=True)
        rows = [
            {"iteration": 0, "eval/accuracy": 0.5},
            {"iteration": 1, "eval/accuracy": 0.5, "train/reward_mean": 0.5}
            | {"train/length_correct": 20.0, "train/length_wrong": 30.0},
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    run_compare(spec, tmp_path / "cmp", progress=False, train_fn=fake_train)
    built = tiny_bases.base_dir(quick_recipe)
    assert seen == [str(built)] and tiny_bases.is_built(built)
    assert spec.run_names() == ["grpo/seed0"]
