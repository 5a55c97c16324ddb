"""Losses: hand-computed values and gradients, the KL sign, GRPO = filtered SFT on a real model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlino.losses import (
    aggregate,
    clipped_surrogate_loss,
    kl_k3,
    policy_loss,
    weighted_likelihood_loss,
)
from rlino.methods import MethodParams, ScoredBatch, resolve, weigh

# N = 2 samples, T = 3 token slots; sample 0 has 2 real tokens, sample 1 has 3.
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def leaf(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


# ---- aggregation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "value", "grad"),
    [
        # (1 + 2) / 2 = 1.5 and (4 + 5 + 6) / 3 = 5, mean 3.25; d/dx = 1 / (N * |o_i|)
        ("seq-mean", 3.25, [[0.25, 0.25, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
        # 18 / 5 real tokens; d/dx = 1 / 5
        ("token-mean", 3.6, [[0.2, 0.2, 0.0], [0.2, 0.2, 0.2]]),
        # 18 / (N * 4); d/dx = 1 / 8
        ("constant", 2.25, [[0.125, 0.125, 0.0], [0.125, 0.125, 0.125]]),
    ],
)
def test_aggregate_values_and_gradients(mode: str, value: float, grad: list[list[float]]) -> None:
    x = leaf([[1.0, 2.0, 99.0], [4.0, 5.0, 6.0]])  # 99 sits under the mask: ignored
    out = aggregate(x, MASK, mode, constant_length=4)
    out.backward()
    assert out.item() == pytest.approx(value)
    torch.testing.assert_close(x.grad, torch.tensor(grad, dtype=torch.float64))


def test_aggregate_rejects_bad_modes() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="constant_length"):
        aggregate(x, MASK, "constant")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(x, MASK, "sum")


@pytest.mark.parametrize(
    ("mode", "value", "grad"),
    [
        # per token -w * logp: sample 0 (w = 2) [2, 4], sample 1 (w = -1) [-0.5, -1, -1.5]
        # seq-mean: (6 / 2 + (-3) / 3) / 2 = 1; d/dlogp = -w / (N * |o_i|)
        ("seq-mean", 1.0, [[-0.5, -0.5, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
        # token-mean: (6 - 3) / 5 = 0.6; d/dlogp = -w / 5
        ("token-mean", 0.6, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]),
        # constant 4: 3 / 8; d/dlogp = -w / 8
        ("constant", 0.375, [[-0.25, -0.25, 0.0], [0.125, 0.125, 0.125]]),
    ],
)
def test_weighted_likelihood_values_and_gradients(
    mode: str, value: float, grad: list[list[float]]
) -> None:
    logp = leaf([[-1.0, -2.0, -7.0], [-0.5, -1.0, -1.5]])
    weights = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss = weighted_likelihood_loss(logp, weights, MASK, mode, constant_length=4)
    loss.backward()
    assert loss.item() == pytest.approx(value)
    torch.testing.assert_close(logp.grad, torch.tensor(grad, dtype=torch.float64))


def test_per_token_weights() -> None:
    """(N, T) weights: a per-sample weight spread over the tokens gives the (N,) loss exactly, and a
    hand-computed per-token case (seq-mean) holds, for both surrogates."""
    logp = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -1.0, -1.5]], dtype=torch.float64)
    per_sample = torch.tensor([2.0, -1.0], dtype=torch.float64)
    spread = per_sample[:, None].expand(2, 3).clone()
    for mode in ("seq-mean", "token-mean"):
        a = weighted_likelihood_loss(logp, per_sample, MASK, mode)
        b = weighted_likelihood_loss(logp, spread, MASK, mode)
        assert a.item() == pytest.approx(b.item())
    # sample 0: tokens weighted 1 and 3 -> (1*1 + 3*2) / 2 = 3.5; sample 1: -1 on its last token
    # only -> -1.5 / 3 = -0.5; seq-mean: (3.5 - 0.5) / 2 = 1.5
    w = torch.tensor([[1.0, 3.0, 50.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    assert weighted_likelihood_loss(logp, w, MASK, "seq-mean").item() == pytest.approx(1.5)
    x = logp.clone().requires_grad_(True)
    loss, stats = clipped_surrogate_loss(x, logp, w, MASK, 0.2, "seq-mean")  # ratio 1
    assert loss.item() == pytest.approx(-(1 * 1 + 3 * 1) / 2 / 2 - (-1.0) / 3 / 2)
    params = MethodParams(name="fisft-grpo")
    _, stats = policy_loss(*resolve(params), logp, MASK, w)
    # logged per-sample weight: the mean over real tokens, (1 + 3) / 2 and -1 / 3
    assert stats["weight_sum"] == pytest.approx(2.0 - 1 / 3)


# ---- clipped surrogate ----------------------------------------------------------------------


def test_clipped_surrogate_inside_and_outside_the_clip_range() -> None:
    # eps = 0.2, ratios per token [1.1 (inside), 1.5 (above), 0.5 (below)] for A = +1 and A = -1.
    # A = +1: min(1.1, 1.1) = 1.1; min(1.5, 1.2) = 1.2 clipped; min(0.5, 0.8) = 0.5 not clipped.
    # A = -1: min(-1.1, -1.1); min(-1.5, -1.2) = -1.5 not clipped; min(-0.5, -0.8) = -0.8 clipped.
    # Loss = -objective: [-1.1, -1.2, -0.5] and [1.1, 1.5, 0.8]; token-mean 0.6 / 6 = 0.1.
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]], dtype=torch.float64)
    ratios = torch.tensor([[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]], dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, stats = clipped_surrogate_loss(logp, old, adv, mask, eps=0.2, mode="token-mean")
    loss.backward()
    assert loss.item() == pytest.approx(0.1)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["ratio_mean"] == pytest.approx(3.1 / 3)
    # d/dlogp of -r A = -A r where unclipped, 0 where the clipped branch is taken; / 6 tokens
    expected = torch.tensor([[-1.1, 0.0, -0.5], [1.1, 1.5, 0.0]], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, expected)


def test_clipped_surrogate_on_policy_is_ratio_one() -> None:
    logp = leaf([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.5]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, stats = clipped_surrogate_loss(logp, logp.detach(), adv, MASK, 0.2, "seq-mean")
    # ratio 1 everywhere: loss = -(2 * 1 + (-1) * 1) / 2 = -0.5
    assert loss.item() == pytest.approx(-0.5)
    assert stats == {"clip_frac": 0.0, "ratio_mean": 1.0}


# ---- KL -------------------------------------------------------------------------------------


def test_kl_k3_values() -> None:
    logp = torch.tensor([[-1.0, -2.0, -1.5]])
    ref = torch.tensor([[-2.0, -1.0, -1.5]])
    # d = ref - logp: -1 -> e^-1 + 1 - 1 = 0.3678794; +1 -> e - 1 - 1 = 0.7182818; 0 -> 0
    expected = torch.tensor([[math.exp(-1), math.e - 2, 0.0]])
    torch.testing.assert_close(kl_k3(logp, ref), expected)


def test_gradient_descent_on_kl_moves_logp_toward_reference() -> None:
    # The framework the paper used had this sign wrong; here + beta * KL must pull toward ref.
    ref = torch.tensor([[-2.0, -1.0, -1.5], [-0.3, -4.0, -0.2]], dtype=torch.float64)
    logp = leaf([[-1.0, -2.0, -1.0], [-1.0, -2.0, -1.0]])
    method, params = resolve(MethodParams(name="grpo", beta=0.5))
    zero_adv = torch.zeros(2, dtype=torch.float64)  # no policy-gradient term: KL alone
    gap_before = (logp - ref).abs()[MASK]
    for _ in range(40):
        loss, stats = policy_loss(method, params, logp, MASK, zero_adv, ref_logp=ref)
        assert stats["loss/kl"] == pytest.approx(0.5 * stats["kl"])
        logp.grad = None
        loss.backward()
        with torch.no_grad():
            logp -= 2.0 * logp.grad
    gap_after = (logp - ref).abs()[MASK]
    assert (gap_after < gap_before).all()
    assert gap_after.max() < 0.5 * gap_before.max()


def test_policy_loss_adds_beta_times_kl_and_reports_stats() -> None:
    logp = leaf([[-1.0, -2.0, -7.0], [-0.5, -1.0, -1.5]])
    ref = logp.detach() - 1.0  # d = -1 on every token: k3 = e^-1 each, seq-mean KL = e^-1
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    method, params = resolve(MethodParams(name="grpo", beta=0.1))
    loss, stats = policy_loss(method, params, logp, MASK, adv, ref_logp=ref)
    # policy part on-policy: -(2 - 1) / 2 = -0.5
    assert stats["loss/policy"] == pytest.approx(-0.5)
    assert stats["kl"] == pytest.approx(math.exp(-1))
    assert loss.item() == pytest.approx(-0.5 + 0.1 * math.exp(-1))
    assert stats["loss/total"] == pytest.approx(loss.item())
    assert (stats["weight_sum"], stats["weight_abs_sum"]) == (1.0, 3.0)
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == 1.0
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(method, params, logp, MASK, adv)
    fisft, fisft_params = resolve(MethodParams(name="fisft", beta=0.1))
    with pytest.raises(ValueError, match="no KL term"):
        policy_loss(fisft, fisft_params, logp, MASK, adv, ref_logp=ref)


def test_policy_loss_likelihood_surrogate_is_weighted_nll() -> None:
    logp = leaf([[-1.0, -2.0, -7.0], [-0.5, -1.0, -1.5]])
    adv = torch.tensor([[2.0, -1.0]], dtype=torch.float64)  # (P, G) = (1, 2) is flattened
    method, params = resolve(MethodParams(name="fisft", aggregation="token-mean"))
    loss, stats = policy_loss(method, params, logp, MASK, adv)
    assert loss.item() == pytest.approx(0.6)  # the token-mean case above
    assert "clip_frac" not in stats and stats["loss/kl"] == 0.0


# ---- the equivalence identity on a real model -----------------------------------------------


def completion_logp(model, tokenizer, prompt: str, completions: list[str]):
    """(logp (N, T), mask (N, T)) of each completion's tokens after `prompt`, right-padded."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    width = max(len(c) for c in c_ids)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([p_ids + c + [pad] * (width - len(c)) for c in c_ids])  # (N, L)
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in c_ids]).bool()  # (N, T)
    attention = torch.cat([torch.ones(len(c_ids), len(p_ids), dtype=torch.long), mask.long()], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits  # (N, L, V)
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)  # (N, L-1, V) predicts tokens 1..L-1
    token_logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (N, L-1)
    return token_logp[:, len(p_ids) - 1 :], mask  # (N, T)


def param_grads(model, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_grpo_gradient_equals_filtered_sft_gradient(tiny_random_model_dir: Path) -> None:
    """beta 0, mu 1, seq-mean, ratio 1: GRPO's gradient IS fisft-grpo's (arXiv 2505.13697)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float64)
    prompt = "Using 3 7 9 make 30:"
    completions = [
        "<answer>3*7+9</answer>", "<answer>9*3</answer>", "no idea", "7+7+7+9=30 so <answer>",
        "<answer>(9-7)*3</answer>", "<answer>9+7*3</answer>", "3", "<answer>3*(7+9)</answer>",
    ]  # fmt: skip
    # P = 2 groups of G = 4: binary, and Countdown-style shaped rewards.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.1, 1.0, 0.0, 0.1]], dtype=torch.float64)
    correct = rewards == 1.0

    def grads(name: str, aggregation: str) -> torch.Tensor:
        method, params = resolve(MethodParams(name=name, aggregation=aggregation))
        adv = weigh(method, params, ScoredBatch(rewards, correct))  # (P, G)
        logp, mask = completion_logp(model, tokenizer, prompt, completions)
        loss, stats = policy_loss(method, params, logp, mask, adv)  # old_logp None: ratio 1
        assert stats.get("clip_frac", 0.0) == 0.0
        return param_grads(model, loss)

    g_grpo = grads("grpo", "seq-mean")
    g_fisft = grads("fisft-grpo", "seq-mean")
    assert g_grpo.abs().max() > 0
    assert (g_grpo - g_fisft).abs().max() <= 1e-6 * g_grpo.abs().max()
    # Not a tautology: averaging over all tokens instead weights samples by length.
    g_token = grads("grpo", "token-mean")
    g_token_fisft = grads("fisft-grpo", "token-mean")
    assert (g_token - g_token_fisft).abs().max() <= 1e-6 * g_token.abs().max()
    cos = torch.dot(g_grpo, g_token) / (g_grpo.norm() * g_token.norm())
    assert cos < 0.999
