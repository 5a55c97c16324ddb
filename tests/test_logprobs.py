"""The fused selective log-softmax equals log_softmax + gather, values and gradients."""

from __future__ import annotations

import pytest
import torch

from rlino.logprobs import selective_log_softmax


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
