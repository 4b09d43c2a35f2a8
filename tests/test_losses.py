"""Every loss against values computed by hand on fixed inputs (see the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from plugins.updaters.losses import ALL_LOSSES, LIST_LOSSES, ipo, kto, orpo, pro, rrhf, sft

T = torch.tensor


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sft_is_mean_token_nll():
    assert sft(T([-6.0, -1.0]), T([3.0, 4.0])).tolist() == pytest.approx([2.0, 0.25])


# One prompt, three answers: summed log-probs, token counts, judge scores.
# Length-normalised p = [-1, -2, -3]; the best (score 3) is answer 0.
LOGPS, TOKENS, SCORES = T([-2.0, -6.0, -3.0]), T([2.0, 3.0, 1.0]), T([3.0, 1.0, 2.0])


def test_rrhf():
    # pairs with r_i < r_j: (1,0): max(0, -2 - -1) = 0; (1,2): max(0, -2 - -3) = 1;
    # (2,0): max(0, -3 - -1) = 0  ->  L_rank = 1;  L_ft = -logps[0] = 2
    assert rrhf(LOGPS, TOKENS, SCORES).item() == pytest.approx(3.0)
    assert rrhf(LOGPS, TOKENS, SCORES, sft_weight=0.5).item() == pytest.approx(2.0)
    # equal scores: no ranking term, SFT on the first best
    assert rrhf(LOGPS, TOKENS, T([1.0, 1.0, 1.0])).item() == pytest.approx(2.0)


def test_pro():
    # order by score: answers 0, 2, 1 -> π = [-1, -3, -2]
    e = math.exp
    first = -math.log(e(-1) / (e(-1) + e(-3) + e(-2)))
    second = -math.log(e(-3) / (e(-3) + e(-2)))
    assert pro(LOGPS, TOKENS, SCORES).item() == pytest.approx(first + second + 1.0, abs=1e-6)
    assert pro(LOGPS, TOKENS, SCORES, sft_weight=0.0).item() == pytest.approx(first + second, abs=1e-6)
    # two answers: PRO's listwise term is the pairwise Bradley-Terry loss
    two = pro(T([-1.0, -2.0]), T([1.0, 1.0]), T([1.0, 0.0]), sft_weight=0.0).item()
    assert two == pytest.approx(-log_sigmoid(1.0), abs=1e-6)


def test_orpo():
    # chosen: -2 over 2 tokens -> log P = -1; rejected: -6 over 3 tokens -> log P = -2
    odds_w = -1 - math.log(1 - math.exp(-1))
    odds_l = -2 - math.log(1 - math.exp(-2))
    expected = 1.0 - 0.1 * log_sigmoid(odds_w - odds_l)
    losses, c, r = orpo(T([-2.0]), T([-6.0]), T([2.0]), T([3.0]), lam=0.1)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert (c.item(), r.item()) == pytest.approx((-0.1, -0.2))


def test_kto():
    # r = [-1 - -2, -1 - -0.5] = [1, -0.5]; z0 = 0.25; β = 0.5
    # desirable:   1 - σ(0.5 (1 - 0.25))        = 1 - σ(0.375)
    # undesirable: 2 (1 - σ(0.5 (0.25 + 0.5)))  = 2 (1 - σ(0.375))
    sig = 1 / (1 + math.exp(-0.375))
    losses, rewards = kto(T([-1.0, -1.0]), T([-2.0, -0.5]), T([True, False]), T(0.25), beta=0.5, undesirable_weight=2.0)
    assert losses.tolist() == pytest.approx([1 - sig, 2 * (1 - sig)], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.25])


def test_ipo_averages_per_token_when_given_counts():
    # log-ratios: chosen 2 over 4 tokens = 0.5, rejected -1 over 2 tokens = -0.5;
    # Δ = 1, β = 0.25 -> (1 - 2)² = 1
    losses, _, _ = ipo(T([0.0]), T([-1.0]), T([-2.0]), T([0.0]), beta=0.25, chosen_tokens=T([4.0]), rejected_tokens=T([2.0]))
    assert losses.item() == pytest.approx(1.0)


def test_every_loss_has_gradients():
    for name, fn in LIST_LOSSES.items():
        lp = LOGPS.clone().requires_grad_()
        fn(lp, TOKENS, SCORES).backward()
        assert lp.grad is not None and torch.isfinite(lp.grad).all(), name
    assert {"sigmoid", "ipo", "hinge", "robust", "rrhf", "pro", "orpo", "kto", "sft"} == set(ALL_LOSSES)
