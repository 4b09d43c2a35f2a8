"""The online-RL losses against hand-computed values, and the grpo updater on the tiny
model: every LoRA weight changes, clipped tokens get no gradient, the reward rises on a
fixed batch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_context

import loop
from plugins.updaters import losses as L
from plugins.updaters.grpo import GRPOUpdater, group_advantages


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    std = math.sqrt(1 / 3)  # Bessel: sum of squares 4 * 0.25 over n - 1 = 3
    assert torch.allclose(L.grpo_advantages(r), (r - 0.5) / (std + 1e-4))
    assert torch.allclose(L.dr_grpo_advantages(r), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # leave-one-out: 1 - (0 + 0 + 1) / 3 = 2/3; 0 - 2/3 = -2/3
    assert torch.allclose(L.rloo_advantages(r), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert torch.equal(L.grpo_advantages(torch.tensor([3.0, 3.0])), torch.zeros(2))


def test_clipped_surrogate_and_kl_by_hand():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 1.1, 0.5]]))  # ratios 1.5, 1.1, 0.5
    adv = torch.tensor([[2.0]])
    loss, clipped = L.clipped_surrogate(logps, old, adv, clip_eps=0.2)
    # A > 0: min(ρA, clip(ρ)A) = 1.2*2, 1.1*2, 0.5*2
    assert torch.allclose(loss, -torch.tensor([[2.4, 2.2, 1.0]]))
    assert clipped.tolist() == [[True, False, False]]
    loss, clipped = L.clipped_surrogate(logps, old, adv, clip_eps=0.2, clip_eps_high=0.6)
    assert torch.allclose(loss, -torch.tensor([[3.0, 2.2, 1.0]])) and not clipped.any()
    loss, clipped = L.clipped_surrogate(logps, old, -adv, clip_eps=0.2)
    # A < 0: min(-2ρ, -2 clip(ρ)) = -3.0, -2.2, -1.6 (0.5 clipped up to 0.8)
    assert torch.allclose(loss, torch.tensor([[3.0, 2.2, 1.6]]))
    assert clipped.tolist() == [[False, False, True]]
    p, q = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    assert torch.allclose(L.k3_kl(p, q), torch.tensor([[math.exp(-1) + 1 - 1]]))


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert L.aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert L.aggregate(per_token, mask, "sequence_mean").item() == pytest.approx((2 + 4) / 2)
    assert L.aggregate(per_token, mask, "dr_grpo", max_tokens=5).item() == pytest.approx(10 / (2 * 5))


def test_ppo_pieces_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old, ref = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, 0.0]])
    r = L.shaped_rewards(torch.tensor([3.0]), old, ref, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1 + 3.0, 0.0]]))
    values = torch.tensor([[0.5, 1.0, 9.0]])
    adv, ret = L.gae(r, values, mask, gamma=1.0, lam=0.5)
    d1 = 3.1 - 1.0  # last token: no next value
    d0 = -0.05 + 1.0 - 0.5
    assert torch.allclose(adv, torch.tensor([[d0 + 0.5 * d1, d1, 0.0]]))
    assert torch.allclose(ret[:, :2], adv[:, :2] + values[:, :2])
    v = L.clipped_value_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([3.0]), clip=0.2)
    assert v.item() == pytest.approx(0.5 * (1.2 - 3.0) ** 2)  # the clipped one is larger
    bt = L.bradley_terry(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([0.5]), label_smoothing=0.1)
    sig = 1 / (1 + math.exp(-0.5))
    assert bt.item() == pytest.approx(-0.9 * math.log(sig) - 0.1 * math.log(1 - sig))


def test_clipped_tokens_get_no_gradient():
    logps = torch.log(torch.tensor([[1.5, 1.0, 0.5]])).requires_grad_()
    loss, clipped = L.clipped_surrogate(logps, torch.zeros(1, 3), torch.tensor([[1.0]]), clip_eps=0.2)
    L.aggregate(loss, torch.ones(1, 3), "token_mean").backward()
    assert logps.grad[0, 0] == 0 and clipped[0, 0]
    assert logps.grad[0, 1] != 0 and logps.grad[0, 2] != 0


GROUPS = [
    ("What is 2+2?", [("Four.", 1.0), ("I do not know, sorry", 0.0), ("4", 1.0), ("five", 0.0)]),
    ("Say hi.", [("Hi there!", 1.0), ("Goodbye?", 0.0), ("hello", 1.0), ("no", 0.0)]),
]


def grpo_selection():
    rows = []
    for i, (q, answers) in enumerate(GROUPS):
        prompt = loop.Prompt(text=q, id=i)
        for j, (text, score) in enumerate(answers):
            cand = loop.Candidate(prompt=prompt, text=text, id=10 * i + j)
            rows.append(loop.Selected(candidate=cand, score=score, label="ranked", group=i))
    return loop.Selection(selected=rows)


def test_group_advantages_follow_the_groups():
    sel = grpo_selection()
    from plugins.updaters.rl import scored_groups

    adv = group_advantages(scored_groups("grpo", sel), "dr_grpo")
    assert adv == [0.5, -0.5, 0.5, -0.5, 0.5, -0.5, 0.5, -0.5]


@pytest.mark.parametrize("advantage,aggregation,beta", [
    ("grpo", "token_mean", 0.0), ("rloo", "sequence_mean", 0.05), ("dr_grpo", "dr_grpo", 0.0)])
def test_grpo_trains_every_lora_weight_and_the_reward_rises(advantage, aggregation, beta, tiny_policy, tmp_path):
    from safetensors.torch import load_file

    ctx = make_context(tiny_policy, phase="update", run_dir=tmp_path)
    updater = GRPOUpdater(GRPOUpdater.Options(
        advantage=advantage, aggregation=aggregation, beta=beta, max_tokens=16, learning_rate=1e-2,
        epochs=4, mini_batch=8, batch_size=4, warmup_ratio=0.0, scheduler="constant",
        lora_r=4, lora_alpha=8, lora_dropout=0.0, clip_eps=0.2, clip_eps_high=0.28))
    sel = grpo_selection()
    result = updater.update(ctx, sel, str(tmp_path / "out"))
    state = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: all moved
    assert len(result.steps) == 4  # 8 candidates, mini_batch 8, 4 epochs
    assert result.steps[-1].metrics["grpo/clip_frac"] > 0  # later epochs move past the clip
    # the policy now prefers the rewarded answers: their log-prob rose relative to the rest
    from plugins.sequences import sequence_logps
    from plugins.updaters.rl import encode_rows

    rows = sel.selected
    enc = encode_rows(ctx, rows, 1024)
    tok = tiny_policy.tokenizer
    with torch.no_grad():
        with tiny_policy.using(None) as m:
            before = sequence_logps(m, [p for p, _ in enc], [r for _, r in enc], tok.pad_token_id, "cpu")
        with tiny_policy.using(str(tmp_path / "out")) as m:
            after = sequence_logps(m, [p for p, _ in enc], [r for _, r in enc], tok.pad_token_id, "cpu")
    good = torch.tensor([s.score == 1.0 for s in rows])
    gain = after - before
    assert gain[good].mean() > gain[~good].mean() + 0.5
    if beta:
        assert result.steps[-1].metrics["grpo/kl"] > 0


def test_grpo_options_refuse_grad_accum():
    with pytest.raises(ValueError, match="mini_batch"):
        GRPOUpdater.Options(grad_accum=2)


def test_ppo_value_loss_falls_on_a_fixed_batch(tiny_policy, tmp_path):
    from safetensors.torch import load_file

    from plugins.updaters.ppo import VALUE_HEAD, PPOUpdater

    ctx = make_context(tiny_policy, phase="update", run_dir=tmp_path)
    updater = PPOUpdater(PPOUpdater.Options(
        learning_rate=3e-3, epochs=8, mini_batch=8, batch_size=8, warmup_ratio=0.0, scheduler="constant",
        lora_r=4, lora_alpha=8, lora_dropout=0.0, kl_coef=0.05, ema_decay=0.5,
        value_clip=10.0))  # one round moves values at most value_clip from the old ones
    result = updater.update(ctx, grpo_selection(), str(tmp_path / "ppo"))
    values = [s.metrics["ppo/value_loss"] for s in result.steps]
    assert len(values) == 8 and values[-1] < 0.5 * values[0]
    assert all(k in result.metrics for k in ("ppo/value_loss", "ppo/kl", "ppo/clip_frac"))
    assert result.steps[0].metrics["ppo/kl"] == pytest.approx(0.0, abs=1e-4)  # starts at the reference
    state = load_file(str(tmp_path / "ppo" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    head = load_file(str(tmp_path / "ppo" / VALUE_HEAD))
    assert head["weight"].abs().sum() > 0  # the head started at zero and learnt
