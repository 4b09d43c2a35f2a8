"""Preference losses against hand-computed values, and the DPO updater on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

import loop
from plugins.generators.hf import HFGenerator
from plugins.updaters.dpo import DPOUpdater
from plugins.updaters.training import lr_lambda as _lr_lambda, plan as _plan
from plugins.updaters.losses import LOSSES, dpo_robust, dpo_sigmoid, hinge, ipo

from conftest import make_context

# Fixed inputs: policy log-probs -1 (chosen) and -3 (rejected), reference -2 for both.
# Δ = (-1 - -2) - (-3 - -2) = 2.  With β = 0.5: βΔ = 1, rewards +0.5 and -0.5.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
LOG_SIG_1 = math.log(1 / (1 + math.exp(-1)))  # log σ(1)  = -0.3132617
LOG_SIG_M1 = math.log(1 / (1 + math.exp(1)))  # log σ(-1) = -1.3132617


def check(result, loss, chosen=0.5, rejected=-0.5):
    losses, c, r = result
    assert losses.item() == pytest.approx(loss, abs=1e-6)
    assert c.item() == pytest.approx(chosen) and r.item() == pytest.approx(rejected)


def test_sigmoid_dpo():
    check(dpo_sigmoid(PC, PR, RC, RR, beta=0.5), 0.3132617)
    # cDPO, ε = 0.1: 0.9 * 0.3132617 + 0.1 * 1.3132617
    check(dpo_sigmoid(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1), 0.4132617)
    # no margin: log 2
    check(dpo_sigmoid(RC, RR, RC, RR, beta=0.5), math.log(2), 0.0, 0.0)


def test_robust_dpo():
    check(dpo_robust(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1), (-0.9 * LOG_SIG_1 + 0.1 * LOG_SIG_M1) / 0.8)
    check(dpo_robust(PC, PR, RC, RR, beta=0.5), 0.3132617)
    with pytest.raises(ValueError):
        dpo_robust(PC, PR, RC, RR, beta=0.5, label_smoothing=0.5)


def test_ipo():
    check(ipo(PC, PR, RC, RR, beta=0.5), 1.0)  # (Δ - 1/(2·0.5))² = (2 - 1)²
    check(ipo(PC, PR, RC, RR, beta=0.25), 0.0, 0.25, -0.25)  # (2 - 2)²


def test_hinge():
    check(hinge(PC, PR, RC, RR, beta=0.5), 0.0)  # max(0, 1 - 1)
    check(hinge(PC, PR, RC, RR, beta=0.25), 0.5, 0.25, -0.25)  # max(0, 1 - 0.5)


def test_losses_are_per_example_and_differentiable():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    for name, fn in LOSSES.items():
        losses, c, r = fn(pc, torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.1)
        assert losses.shape == (2,), name
        assert not c.requires_grad and not r.requires_grad
        losses.sum().backward()
    assert pc.grad is not None


def test_options_validation():
    with pytest.raises(ValueError, match="sigmoid"):
        DPOUpdater.Options(loss="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOUpdater.Options(loss="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        DPOUpdater.Options(lr=1e-3)  # unknown field
    assert DPOUpdater(DPOUpdater.Options(lora_r=8)).lora_rank() == 8


def test_plan_and_schedule():
    opts = DPOUpdater.Options(batch_size=2, grad_accum=2, epochs=2)
    plan = _plan(5, opts, seed=1)
    assert plan == _plan(5, opts, seed=1)
    # 5 pairs -> 3 micro-batches per epoch -> 2 steps per epoch (2 + 1 micro-batches)
    assert [(e, [len(m) for m in mbs]) for e, mbs in plan] == [(0, [2, 2]), (0, [1]), (1, [2, 2]), (1, [1])]
    for epoch in (0, 1):
        seen = sorted(i for e, mbs in plan if e == epoch for m in mbs for i in m)
        assert seen == [0, 1, 2, 3, 4]
    assert len(_plan(5, DPOUpdater.Options(batch_size=2, max_steps=7), seed=1)) == 7
    f = _lr_lambda(DPOUpdater.Options(warmup_ratio=0.2), total=10)
    assert [f(s) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.875])
    assert 0 < f(9) < 0.2
    c = _lr_lambda(DPOUpdater.Options(warmup_ratio=0.0, scheduler="cosine"), total=4)
    assert [c(s) for s in range(4)] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 + 0.5 * math.cos(3 * math.pi / 4)])


# -- the updater on the tiny model -------------------------------------------------

ANSWERS = [
    ("What is 2+2?", "Four.", "I do not know, sorry"),
    ("Name a colour.", "Blue.", "no"),
    ("Say hi.", "Hi there!", "Goodbye?"),
    ("Count to three.", "1, 2, 3.", "three two"),
]


def make_pairs():
    pairs = []
    for i, (q, good, bad) in enumerate(ANSWERS):
        prompt = loop.Prompt(text=q, id=i)
        pairs.append(
            loop.Pair(
                prompt=prompt,
                chosen=loop.Candidate(prompt=prompt, text=good, id=10 * i),
                rejected=loop.Candidate(prompt=prompt, text=bad, id=10 * i + 1),
                chosen_score=4.0,
                rejected_score=1.0,
            )
        )
    return pairs


def fast_options(**kw):
    base = dict(
        learning_rate=1e-2,
        epochs=6,
        batch_size=4,
        warmup_ratio=0.0,
        scheduler="constant",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
    )
    base.update(kw)
    return DPOUpdater.Options(**base)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def round_one(tiny_policy, tmp_path_factory):
    """One fresh-adapter DPO update; records the LoRA weights right after initialisation."""
    policy = tiny_policy
    snapshots = {}
    original = policy.trainable

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        snapshots["before"] = lora_state(model)
        snapshots["requires_grad"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return model

    progress = []
    ctx = make_context(policy, phase="update", progress=lambda done, total, metrics: progress.append((done, total, metrics)))
    out = tmp_path_factory.mktemp("round-1") / "adapter"
    policy.trainable = spy
    try:
        result = DPOUpdater(fast_options()).update(ctx, loop.Selection(pairs=make_pairs()), str(out))
    finally:
        del policy.trainable
    snapshots["after"] = lora_state(policy._peft)
    return {"result": result, "dir": str(out), "progress": progress, **snapshots}


def test_every_lora_parameter_changes(round_one):
    before, after = round_one["before"], round_one["after"]
    assert round_one["requires_grad"] == set(before)  # only LoRA weights train
    assert any("lora_A" in n for n in before) and any("lora_B" in n for n in before)
    for name, value in before.items():
        if "lora_B" in name:
            assert torch.count_nonzero(value) == 0, "a fresh LoRA starts with B = 0"
        assert not torch.equal(value, after[name]), f"{name} did not change"


def test_loss_falls_and_steps_are_logged(round_one):
    result = round_one["result"]
    steps = result.steps
    assert [s.step for s in steps] == list(range(1, 7))
    assert steps[0].loss == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference
    assert steps[-1].loss < 0.6 * steps[0].loss
    for s in steps:
        assert s.learning_rate == pytest.approx(1e-2)
        assert s.grad_norm > 0
        assert set(s.metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}
    assert steps[-1].metrics["rewards/margin"] > 0 and steps[-1].metrics["rewards/accuracy"] == 1.0
    assert result.metrics["train/loss"] == pytest.approx(sum(s.loss for s in steps) / 6)
    assert result.metrics["rewards/margin"] == pytest.approx(steps[-1].metrics["rewards/margin"])
    assert [(d, t) for d, t, _ in round_one["progress"]] == [(i, 6) for i in range(1, 7)]
    assert round_one["progress"][0][2]["loss"] == pytest.approx(steps[0].loss)


def test_adapter_folder_loads_with_plain_peft(round_one, tiny_policy, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), round_one["dir"])
    plain.eval()
    ids = torch.tensor([[4, 30, 31, 32, 2, 5, 40, 41]])
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        with tiny_policy.using(round_one["dir"]) as model:
            assert not model.training
            got = model(input_ids=ids).logits
        with tiny_policy.using(None) as model:
            base = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)


def test_continuing_starts_from_the_previous_adapter_and_its_reference(round_one, tiny_policy, tmp_path):
    """lr ~ 0 (1e-30; 0 itself is refused as a config): the new adapter must equal the
    previous one (to 1e-20), and every step's implicit
    rewards must be 0 (policy == reference == previous adapter). A fresh start would
    change the weights; a base-model reference would give nonzero rewards."""
    from safetensors.torch import load_file

    ctx = make_context(tiny_policy, phase="update", round=2, adapter=round_one["dir"])
    out = tmp_path / "round-2"
    result = DPOUpdater(fast_options(learning_rate=1e-30, epochs=2)).update(ctx, loop.Selection(pairs=make_pairs()), str(out))
    for s in result.steps:
        assert s.loss == pytest.approx(math.log(2), abs=1e-5)
        assert s.metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
        assert s.metrics["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    previous = load_file(f"{round_one['dir']}/adapter_model.safetensors")
    new = load_file(f"{out}/adapter_model.safetensors")
    assert set(previous) == set(new)
    for k in previous:
        assert torch.allclose(previous[k], new[k], rtol=0, atol=1e-20), k


def test_reference_is_the_previous_policy(round_one, tiny_policy, tmp_path):
    """With a real step, round 2's first-step rewards are 0 against the round-1 adapter
    (they would be round 1's final rewards against the base), and the reference the
    updater uses equals the generator's log-probs under that adapter."""
    pairs = make_pairs()
    ctx = make_context(tiny_policy, phase="update", round=2, adapter=round_one["dir"])
    gen = HFGenerator()
    ref_chosen = gen.logprobs(ctx, [p.prompt.chat() for p in pairs], [p.chosen.text for p in pairs], adapter=round_one["dir"])
    base_chosen = gen.logprobs(ctx, [p.prompt.chat() for p in pairs], [p.chosen.text for p in pairs], adapter=None)
    result = DPOUpdater(fast_options(epochs=1)).update(ctx, loop.Selection(pairs=pairs), str(tmp_path / "r2"))
    first = result.steps[0].metrics
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    # the same pairs against the base reference, as round 1 saw them, had a clear margin
    assert round_one["result"].steps[-1].metrics["rewards/margin"] > 0.1
    assert any(abs(a - b) > 1e-3 for a, b in zip(ref_chosen, base_chosen))


def test_fresh_adapter_after_a_loaded_one(round_one, tiny_policy, tmp_path):
    """A new run (adapter None) on a policy whose slot already holds weights starts over:
    B = 0 again, so the first step sees policy == base == reference."""
    with tiny_policy.using(round_one["dir"]):
        pass  # the slot now holds round 1's weights
    ctx = make_context(tiny_policy, phase="update", seed=5)
    out = tmp_path / "fresh"
    result = DPOUpdater(fast_options(epochs=2)).update(ctx, loop.Selection(pairs=make_pairs()), str(out))
    assert result.steps[0].loss == pytest.approx(math.log(2), abs=1e-6)
    assert result.steps[1].loss < result.steps[0].loss
    assert (out / "adapter_model.safetensors").is_file()


def test_no_pairs_is_a_clear_error(tiny_policy, tmp_path):
    ctx = make_context(tiny_policy, phase="update")
    with pytest.raises(loop.UserError, match="no preference pairs"):
        DPOUpdater().update(ctx, loop.Selection(), str(tmp_path / "x"))


def test_registered_through_the_hook():
    from plugins.updaters import dpo

    got = []
    dpo.register_updaters(got.append)
    assert got == [DPOUpdater] and DPOUpdater.name == "dpo"


def test_gradient_checkpointing_trains_the_same(round_one, tiny_policy, tmp_path):
    """Recomputing activations in the backward pass (packed rows, 4D mask) changes nothing."""
    ctx = make_context(tiny_policy, phase="update")
    result = DPOUpdater(fast_options(gradient_checkpointing=True)).update(
        ctx, loop.Selection(pairs=make_pairs()), str(tmp_path / "adapter")
    )
    want = [s.loss for s in round_one["result"].steps]
    assert [s.loss for s in result.steps] == pytest.approx(want, abs=1e-5)
