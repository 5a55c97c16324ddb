"""rlino's device code on CUDA, and the GPU check script (benchmarks/gpu_check.py) as a smoke run.

The `test_cuda_*` tests run on the device named by $RLINO_TEST_DEVICE (default cuda) and are
skipped when that is CUDA and none is there, so the ordinary CPU suite skips them;
`benchmarks/gpu_check.py` runs them on the GPU machine (`-k cuda`), and its `--small --device cpu`
run, tested here, runs them on the CPU. They check what CPU tests cannot: that the built-in sampler
gives HF's greedy tokens in bf16 on the device, that token log-probs on the device match the CPU
in fp32, and that one GRPO step on the device trains with finite metrics.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_rollout import hf_greedy
from test_train import tiny_config

from rlino.policy import load_policy, token_logprobs_and_entropy
from rlino.resolve import tiny_model_dir
from rlino.rollout import SamplingConfig, generate
from rlino.setup import build, make_optimizer
from rlino.step import step
from rlino.tasks import encode_prompts, get_task

DEVICE = os.environ.get("RLINO_TEST_DEVICE", "cuda")
needs_device = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(),
    reason=f"RLINO_TEST_DEVICE={DEVICE} but no CUDA device here",
)
REPO = Path(__file__).resolve().parents[1]
NEAR_TIE = 0.25
"""fp32 logit gap below which bf16 rounding may pick either of two tokens (tiny-countdown's
logits are O(10); a bf16 step there is 0.06, and four layers add a few such steps)"""


def logit_gap(model: torch.nn.Module, prefix: list[int], a: int, b: int) -> float:
    """|logit(a) - logit(b)| after `prefix`, in fp32 (how near a tie the two choices were)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
    return abs(float(logits[a] - logits[b]))


@needs_device
def test_cuda_builtin_greedy_matches_hf_generate_in_bf16() -> None:
    """Greedy tokens of the built-in sampler = HF generate's, bf16 on the device.

    Two implementations in bf16 may round a near-tie differently; a row that differs must differ
    first at a near-tie of the fp32 model, and most rows must match exactly.
    """
    policy = load_policy(str(tiny_model_dir()), device=DEVICE, dtype="bf16")
    task = get_task("countdown", train_size=0, test_size=12)
    prompts = encode_prompts(policy.tokenizer, task, task.examples("test"), "r1")
    config = SamplingConfig(temperature=0, max_new_tokens=32)
    r = generate(policy, prompts, 1, config, seed=0)
    ours = [ids[m].tolist() for ids, m in zip(r.completion_ids, r.completion_mask, strict=True)]
    theirs = hf_greedy(policy, prompts, 32)
    reference = load_policy(str(tiny_model_dir()), device="cpu", dtype="fp32").model
    exact = 0
    for prompt, a, b in zip(prompts, ours, theirs, strict=True):
        if a == b:
            exact += 1
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        assert k is not None, f"one greedy completion is a prefix of the other: {a} vs {b}"
        gap = logit_gap(reference, prompt + a[:k], a[k], b[k])
        assert gap < NEAR_TIE, f"greedy tokens differ at step {k}, fp32 logit gap {gap:.3f}"
    assert exact >= len(prompts) // 2, f"only {exact} of {len(prompts)} rows match exactly"


@needs_device
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_token_logprobs_match_cpu_fp32(tiny_random_model_dir: Path, dtype: str) -> None:
    """token_logprobs_and_entropy on the device = on the CPU in fp32 (bf16: to its precision),
    and in fp32 its gradient too."""
    cpu = load_policy(str(tiny_random_model_dir), device="cpu", dtype="fp32")
    dev = load_policy(str(tiny_random_model_dir), device=DEVICE, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(cpu.tokenizer), (4, 24), generator=gen)
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[1, :5] = attn[3, :2] = False  # left padding
    start = 10
    logp_cpu, ent_cpu = token_logprobs_and_entropy(cpu.model, ids, attn, start, chunk_size=16)
    logp_cpu.sum().backward()
    logp, ent = token_logprobs_and_entropy(
        dev.model, ids.to(dev.device), attn.to(dev.device), start, chunk_size=16
    )
    logp.sum().backward()
    atol = 2e-4 if dtype == "fp32" else 0.1
    assert logp.device.type == torch.device(DEVICE).type
    assert torch.allclose(logp.float().cpu(), logp_cpu.detach(), atol=atol)
    assert torch.allclose(ent.float().cpu(), ent_cpu.detach(), atol=atol)
    if dtype == "fp32":
        grads = zip(dev.model.parameters(), cpu.model.parameters(), strict=True)
        for p_dev, p_cpu in grads:
            assert torch.allclose(p_dev.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-4)


@needs_device
def test_cuda_grpo_step_trains_with_finite_metrics(tiny_random_model_dir: Path) -> None:
    """One GRPO step (bf16 compute, fp32 master, KL reference) on the device."""
    config = tiny_config(
        tiny_random_model_dir,
        "grpo",
        model={"device": DEVICE, "dtype": "bf16"},
        method={"beta": 0.1},
        optim={"lr": 1e-3},
    )
    setup = build(config)
    assert setup.policy.device.type == torch.device(DEVICE).type
    optimizer = make_optimizer(setup)
    before = [p.detach().clone() for p in setup.policy.model.parameters()]
    metrics = step(setup, 0, optimizer).metrics
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert metrics["optim/nonfinite_steps"] == 0
    after = list(setup.policy.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.slow
def test_gpu_check_small_cpu_run_reports_every_section(tmp_path: Path) -> None:
    """`gpu_check.py --small --device cpu`: one JSON object with numbers in every section, also
    with `datasets`, `gguf` and `vllm` unimportable (as on the GPU machine)."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('datasets', 'gguf', 'vllm'):\n    sys.modules[name] = None\n"
    )
    out = tmp_path / "check.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--small",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert report["errors"] == [] and report["ok"], json.dumps(report, indent=1)[:4000]
    assert {"datasets", "gguf", "vllm"} <= set(report["env"]["missing"])
    assert report["model"]["params"] > 0
    assert report["device"]["bf16_matmul_tflops"] > 0
    tests = report["tests"]
    assert tests["passed"] == 4 and tests["failed"] == tests["errors"] == 0, tests
    (row,) = report["rollout"]["batches"]
    assert row["rlino_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["ratio"] > 0
    measured = report["grpo_step"]["measured"]
    assert measured["iteration"] == 1 and measured["metrics_finite"]
    assert measured["trained_rows"] == measured["rows"] == 4  # the KL term runs every row
    assert measured["rollout_s"] > 0 and measured["update_s"] > 0
    assert report["grpo_step"]["mfu"]["iteration"] > 0
    assert report["fsdp"]["ok"] is True
    assert "skipped" in report["cpu_tests"]
