"""Every updater on the tiny model: only LoRA weights train, every one changes, the loss
falls on a fixed batch, and the adapter folder is written."""

from __future__ import annotations

import pytest
import torch

import loop
from plugins.updaters.dpo import DPOUpdater
from plugins.updaters.kto import KTOUpdater
from plugins.updaters.orpo import ORPOUpdater
from plugins.updaters.raft import RAFTUpdater
from plugins.updaters.ranked import PROUpdater, RRHFUpdater, ranked_groups

from conftest import make_context

ANSWERS = [
    ("What is 2+2?", ["Four.", "4, I think", "I do not know, sorry"]),
    ("Name a colour.", ["Blue.", "blue or red", "no"]),
    ("Say hi.", ["Hi there!", "hello", "Goodbye?"]),
    ("Count to three.", ["1, 2, 3.", "one two", "three two"]),
]


def candidates():
    out = []
    for i, (q, answers) in enumerate(ANSWERS):
        prompt = loop.Prompt(text=q, id=i)
        out.append([loop.Candidate(prompt=prompt, text=a, id=10 * i + j) for j, a in enumerate(answers)])
    return out


def pairs_selection():
    return loop.Selection(pairs=[
        loop.Pair(prompt=c[0].prompt, chosen=c[0], rejected=c[2], chosen_score=3.0, rejected_score=1.0)
        for c in candidates()
    ])


def top_selection():
    return loop.Selection(selected=[loop.Selected(candidate=c[0], score=3.0, group=c[0].prompt.id) for c in candidates()])


def ranked_selection():
    return loop.Selection(selected=[
        loop.Selected(candidate=x, score=3.0 - r, rank=r, label="ranked", group=x.prompt.id)
        for c in candidates() for r, x in enumerate(c)
    ])


def labels_selection():
    rows = []
    for c in candidates():
        rows.append(loop.Selected(candidate=c[0], score=3.0, label="desirable", group=c[0].prompt.id))
        rows.append(loop.Selected(candidate=c[2], score=1.0, rank=2, label="undesirable", group=c[0].prompt.id))
    return loop.Selection(selected=rows)


FAST = dict(learning_rate=1e-2, epochs=6, batch_size=8, warmup_ratio=0.0, scheduler="constant",
            lora_r=4, lora_alpha=8, lora_dropout=0.0)

CASES = {
    "dpo-ipo": (DPOUpdater, dict(loss="ipo", beta=0.5), pairs_selection),
    "dpo-hinge": (DPOUpdater, dict(loss="hinge"), pairs_selection),
    "dpo-robust": (DPOUpdater, dict(loss="robust", label_smoothing=0.1), pairs_selection),
    "orpo": (ORPOUpdater, {}, pairs_selection),
    "raft": (RAFTUpdater, {}, top_selection),
    "rrhf": (RRHFUpdater, {}, ranked_selection),
    "pro": (PROUpdater, {}, ranked_selection),
    "kto": (KTOUpdater, {}, labels_selection),
}


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("case", sorted(CASES))
def test_updater_trains_every_lora_weight_and_the_loss_falls(case, tiny_policy, tmp_path):
    cls, extra, make_selection = CASES[case]
    policy = tiny_policy
    snap = {}
    original = policy.trainable

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        snap["before"] = lora_state(model)
        snap["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return model

    ctx = make_context(policy, phase="update", seed=3)
    policy.trainable = spy
    try:
        result = cls(cls.Options(**FAST, **extra)).update(ctx, make_selection(), str(tmp_path / "a"))
    finally:
        del policy.trainable
    after = lora_state(policy._peft)
    assert snap["trainable"] == set(snap["before"])
    for name, value in snap["before"].items():
        assert not torch.equal(value, after[name]), f"{case}: {name} did not change"
    losses = [s.loss for s in result.steps]
    assert len(losses) == 6 and all(s.grad_norm > 0 for s in result.steps if s.loss > 0)
    assert losses[-1] < 0.9 * losses[0], f"{case}: {losses}"
    assert result.metrics["train/final_loss"] == pytest.approx(losses[-1])
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_wrong_selection_shape_is_a_clear_error(tiny_policy, tmp_path):
    ctx = make_context(tiny_policy, phase="update")
    with pytest.raises(loop.UserError, match="ranked"):
        RRHFUpdater().update(ctx, pairs_selection(), str(tmp_path / "x"))
    with pytest.raises(loop.UserError, match="labels"):
        KTOUpdater().update(ctx, top_selection(), str(tmp_path / "x"))
    with pytest.raises(loop.UserError, match="pairs"):
        ORPOUpdater().update(ctx, ranked_selection(), str(tmp_path / "x"))


def test_ranked_groups_are_best_first_and_drop_singletons():
    rows = ranked_selection().selected[::-1]
    rows.append(loop.Selected(candidate=loop.Candidate(prompt=loop.Prompt("q", id=9), text="x"), label="ranked", group=9))
    groups = ranked_groups(rows)
    assert len(groups) == 4 and all([s.rank for s in g] == [0, 1, 2] for g in groups)


def test_options_share_one_base():
    from plugins.updaters.training import LoRAOptions

    for cls, _, _ in CASES.values():
        assert issubclass(cls.Options, LoRAOptions)
        assert cls(cls.Options(lora_r=8)).lora_rank() == 8
    with pytest.raises(ValueError):
        KTOUpdater.Options(beta=0)
