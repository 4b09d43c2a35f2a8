"""Method details on the tiny model: KTO's mismatched pairs for its reference point, and
the reference policy of DPO-family losses (``updater.reference``)."""

from __future__ import annotations

import pytest

import loop
from plugins.selectors.ranked import LabelSelector
from plugins.updaters.dpo import DPOUpdater
from plugins.updaters.kto import KTOUpdater, kl_partners

from conftest import make_context
from test_updaters import FAST, candidates, pairs_selection


def test_no_kl_pair_shares_its_prompt():
    # what the labels selector emits: each prompt's desirable and undesirable side by side
    groups = candidates()
    flat = [c for g in groups for c in g]
    scores = {c.id: float(3 - c.id % 10) for c in flat}
    sel = LabelSelector().select(None, flat, scores, [])
    prompts = [s.candidate.prompt.text for s in sel.selected]
    assert prompts[0] == prompts[1]  # the old shift over examples paired these two
    partners = kl_partners(prompts)
    assert all(prompts[i] != prompts[j] for i, j in enumerate(partners))
    # every answer is used as someone's mismatched answer (a shift, not a resample)
    assert sorted(partners) == list(range(len(prompts)))
    # uneven groups too
    uneven = ["a", "a", "a", "b", "c", "c"]
    assert all(uneven[i] != uneven[j] for i, j in enumerate(kl_partners(uneven)))
    assert kl_partners(["a", "a"]) is None


def test_kto_with_one_prompt_trains_without_the_estimate(tiny_policy, tmp_path):
    prompt = loop.Prompt(text="Say hi.", id=1)
    rows = [loop.Selected(candidate=loop.Candidate(prompt=prompt, text=t, id=i), label=lab, group=1)
            for i, (t, lab) in enumerate([("Hi!", "desirable"), ("no", "undesirable")])]
    events = []
    ctx = make_context(tiny_policy, phase="update")
    ctx._event = lambda **kw: events.append(kw["message"])
    result = KTOUpdater(KTOUpdater.Options(**{**FAST, "epochs": 1})).update(
        ctx, loop.Selection(selected=rows), str(tmp_path / "a"))
    assert result.steps and any("z0 = 0" in e for e in events)
    assert all(s.metrics["kto/kl"] == 0 for s in result.steps)


@pytest.mark.parametrize("reference", ["previous", "base"])
def test_dpo_reference_policy(reference, tiny_policy, tmp_path):
    """Round 2 continues round 1's adapter. Against the previous policy the first step's
    implicit rewards are 0 (policy = reference before any step); against the base model
    they are not, and the result says which reference it used."""
    opts = DPOUpdater.Options(**{**FAST, "epochs": 1}, beta=0.5)
    first = DPOUpdater(opts).update(make_context(tiny_policy, phase="update", round=1),
                                    pairs_selection(), str(tmp_path / "r1"))
    assert first.reference == "base"
    ctx = make_context(tiny_policy, phase="update", round=2, adapter=str(tmp_path / "r1"))
    updater = DPOUpdater(opts.model_copy(update={"reference": reference}))
    result = updater.update(ctx, pairs_selection(), str(tmp_path / "r2"))
    step1 = result.steps[0].metrics
    if reference == "previous":
        assert result.reference == "round-1"
        assert step1["rewards/chosen"] == pytest.approx(0, abs=1e-5)
        assert step1["rewards/rejected"] == pytest.approx(0, abs=1e-5)
    else:
        assert result.reference == "base"
        assert abs(step1["rewards/chosen"]) > 1e-3 and abs(step1["rewards/margin"]) > 1e-3


def test_reference_is_an_option_of_reference_updaters_only():
    assert DPOUpdater.Options(reference="base").reference == "base"
    assert KTOUpdater.Options().reference == "previous"
    with pytest.raises(ValueError):
        DPOUpdater.Options(reference="initial")
    from plugins.updaters.orpo import ORPOUpdater

    with pytest.raises(ValueError):
        ORPOUpdater.Options(reference="base")


# -- [[stages]]: per-round updater and selector ---------------------------------------


def test_stages_choose_each_rounds_updater(tmp_path):
    from tests.core_helpers import rows, run_inprocess, write_config

    extra = ('[[stages]]\nrounds = 1\nupdater = { name = "fake", steps = 1 }\n\n'
             '[[stages]]\nrounds = 2\nupdater = { name = "fake", steps = 2 }\n')
    run_dir = run_inprocess(write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=3, extra=extra))
    db = run_dir / "run.db"
    steps = rows(db, "select round, count(*) n from train_steps group by round order by round")
    assert [(r["round"], r["n"]) for r in steps] == [(1, 1), (2, 2), (3, 2)]
    import json

    saved = json.loads((run_dir / "config.json").read_text())
    assert [s["updater"] for s in saved["stages"]] == [
        {"name": "fake", "steps": 1, "sleep": 0.0, "nan_at": -1},
        {"name": "fake", "steps": 2, "sleep": 0.0, "nan_at": -1}]


def test_stages_must_cover_the_rounds(tmp_path):
    from tests.core_helpers import cli, write_config

    extra = '[[stages]]\nrounds = 1\nupdater = { name = "fake" }\n'
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=3, extra=extra)
    proc = cli("run", str(config), check_rc=2)
    assert "stages: their rounds add up to 1 but the run has rounds = 3" in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cai_stages_config_validates():
    from pathlib import Path

    from loop.errors import ConfigError
    from loop.runs import prepare

    config = str(Path(__file__).resolve().parent.parent / "configs" / "cai_stages.toml")
    cfg, comps = prepare(config)
    assert [(s.first, s.last, s.updater.name) for s in comps.stages] == [(1, 1, "sft"), (2, 2, "dpo")]
    assert comps.updater_for(1).options.train_on == "revisions"
    assert comps.selector_for(2) is comps.selector and cfg.selection.combine == "zscore"
    with pytest.raises(ConfigError, match="same lora_r"):
        prepare(config, ["stages.1.updater.lora_r=16"])


def test_tinyworld_judge_is_the_verifier_on_task_prompts():
    from plugins.tinyworld import TinyworldJudge

    p = loop.Prompt(text="Sort the letters: c a b")
    other = loop.Prompt(text="Sort these letters please")
    cands = [loop.Candidate(prompt=p, text="a b c"), loop.Candidate(prompt=p, text="c a b"),
             loop.Candidate(prompt=other, text="a b c")]
    res = TinyworldJudge().judge(None, cands)
    assert [j.score for j in res.judgments] == [5.0, 0.0, None]
    assert res.judgments[2].error == "not a tinyworld prompt"


def test_cut_revisions_trip_the_judge_guard():
    """Revisions cut at revision_max_new_tokens: cai/truncated_rate, and past
    [guards] max_truncated_rate the judge guard fails the phase naming the option."""
    from pathlib import Path

    from loop.guards import GuardFailed, GuardsConfig, check_judge
    from plugins.judges.constitutional import ConstitutionalJudge
    from test_judges import RuleGenerator

    def reply(content):
        if content.startswith("Read the exchange"):
            return "a short critique", "stop"
        return "a revision that never ends", "length"

    ctx = make_context(generator=RuleGenerator(reply), phase="judge",
                       source_dir=Path(__file__).resolve().parent.parent)
    p = loop.Prompt(text="Q", id=1)
    cands = [loop.Candidate(prompt=p, text=f"a{i}", id=i, sample_index=i) for i in range(3)]
    judge = ConstitutionalJudge(ConstitutionalJudge.Options(revision_max_new_tokens=16), label="cai")
    res = judge.judge(ctx, cands)
    assert res.metrics["cai/truncated_rate"] == 1.0 and res.candidates == []
    assert (res.outputs, res.truncated) == (6, 3)  # critiques and revisions together
    with pytest.raises(GuardFailed, match=r"judges\.0\.revision_max_new_tokens=64"):
        check_judge(GuardsConfig(max_truncated_rate=0.4), field="judges[0]", judge=judge,
                    judgments=res.judgments, outputs=res.outputs, truncated=res.truncated,
                    round=1, run_dir="runs/x")
