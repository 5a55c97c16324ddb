"""The fused selective log-softmax equals log_softmax + gather, values and gradients."""

from __future__ import annotations

import pytest
import torch

from rlino.logprobs import LOW_PRECISION_WEIGHT_GRAD_ROWS, selective_log_softmax


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_naive_log_softmax_and_its_gradient(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    upstream = torch.randn(300, dtype=torch.float64)

    fused = selective_log_softmax(hidden, weight, targets, chunk=chunk)
    (fused * upstream).sum().backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    naive = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (naive * upstream).sum().backward()
    torch.testing.assert_close(fused.double(), naive.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_weight, weight.grad, rtol=0, atol=1e-5)


def test_model_logprobs_use_the_fused_path_and_agree(tiny_random_model_dir) -> None:
    from rlino.policy import load_policy, token_logprobs_and_entropy

    policy = load_policy(str(tiny_random_model_dir))
    ids = torch.randint(3, 40, (3, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # a left-padded row
    fused, _ = token_logprobs_and_entropy(policy.model, ids, mask, 5, with_entropy=False)
    plain, _ = token_logprobs_and_entropy(policy.model, ids, mask, 5, with_entropy=True)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    fused.sum().backward()
    assert policy.model.get_output_embeddings().weight.grad is not None


def test_many_rows_take_several_weight_gradient_blocks() -> None:
    from rlino.logprobs import WEIGHT_GRAD_ROWS

    torch.manual_seed(1)
    rows = 2 * WEIGHT_GRAD_ROWS + 76
    hidden = torch.randn(rows, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (rows,))
    upstream = torch.randn(rows, dtype=torch.float64)
    (selective_log_softmax(hidden, weight, targets, chunk=100) * upstream).sum().backward()
    fused = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    naive = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (naive * upstream).sum().backward()
    torch.testing.assert_close(fused[0], hidden.grad, rtol=0, atol=1e-5)  # lse is kept in fp32
    torch.testing.assert_close(fused[1], weight.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [200, LOW_PRECISION_WEIGHT_GRAD_ROWS + 100])
def test_under_bf16_autocast_the_matmuls_run_in_bf16(rows: int) -> None:
    """Values and gradients match an exact computation on the bf16-rounded inputs (not the fp32
    ones: the matmuls do run in bf16), and the gradients come back in the inputs' fp32; both with
    the weight gradient as one bf16 product (200 rows) and summed in fp32 over blocks (more rows
    than one product takes)."""
    torch.manual_seed(2)
    hidden = torch.randn(rows, 64, requires_grad=True)
    weight = (0.1 * torch.randn(500, 64)).requires_grad_()
    targets = torch.randint(0, 500, (rows,))
    upstream = torch.randn(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = selective_log_softmax(hidden, weight, targets, chunk=64)
    (fused * upstream).sum().backward()
    assert fused.dtype == hidden.grad.dtype == weight.grad.dtype == torch.float32

    h = hidden.detach().bfloat16().double().requires_grad_()
    w = weight.detach().bfloat16().double().requires_grad_()
    exact = torch.log_softmax(h @ w.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (exact * upstream.double()).sum().backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().double() - b).norm() / b.norm())

    assert rel(fused, exact.detach()) < 1e-3
    assert rel(hidden.grad, h.grad) < 1e-2 and rel(weight.grad, w.grad) < 1e-2
    fp32 = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    assert rel(fused, fp32.detach().double()) > 1e-6  # bf16 arithmetic, not fp32
