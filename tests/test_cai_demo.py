"""configs/cai_demo.toml end to end on the tiny model: constitutional critique and revision,
pairwise preference and the self-rewarding judge in one run, two rounds, with a shortened
recipe (as tests/test_prompt_demos.py). The tiny model only knows its task's words, so this
checks the mechanics: what is stored, linked, combined and measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugins.judges.constitutional import load_constitution
from plugins.tinyworld import task
from tests.core_helpers import run_inprocess
from tests.test_demo import q

ROOT = Path(__file__).resolve().parent.parent

# The seed recipe of tests/world_runs.py (250 steps), in the session's shared runs folder
# (conftest's world_runs_dir), so the tiny model is built once for every world run.
SHORT = [
    "--set", "model.build.steps=250",
    "--set", "rounds=2",
    "--set", "prompts.0.per_round=8",
    "--set", "generate.n=3",
    "--set", "evaluators.0.heldout=8",
    "--set", "updater.max_steps=2",
    "--set", "updater.batch_size=8",
    "--set", "judges.1.samples=2",
    "--set", "judges.0.per_prompt=2",
    "--set", "judges.0.revision_max_new_tokens=64",
]


@pytest.fixture(scope="module")
def run_dir(world_runs_dir) -> Path:
    return run_inprocess(ROOT / "configs" / "cai_demo.toml", "--set", f"runs_dir={world_runs_dir}",
                         *SHORT)


def test_revisions_are_linked_offered_and_judged(run_dir):
    db = run_dir / "run.db"
    assert q(db, "select status from runs")[0]["status"] == "completed"
    principles = {p.name for p in load_constitution(ROOT / "prompts" / "constitution.toml").principles}
    revisions = q(db, "select c.*, o.prompt_id as original_prompt, o.source as original_source "
                      "from candidates c join candidates o on o.id = c.parent_id "
                      "where c.source = 'revision'")
    assert revisions, "no revision in two rounds"
    for r in (1, 2):
        m = {x["name"]: x["value"] for x in q(db, "select name, value from metrics where round = ?", [r])}
        assert m["cai/revised"] == 8 * 2
        assert m["cai/revisions"] + m["cai/failed"] + m["cai/unchanged"] == 8 * 2
        assert m["cai/revisions"] == len([x for x in revisions if x["round"] == r])
    for rev in revisions:
        assert rev["prompt_id"] == rev["original_prompt"] and rev["original_source"] == "policy"
        passes = json.loads(rev["meta"])["passes"]
        assert len(passes) == 1 and passes[0]["principle"] in principles and passes[0]["used"]
        assert rev["text"] == passes[0]["revision"].strip()
    # every revision is offered as preferred to its original
    offered = q(db, "select * from pairs where source = 'constitutional' and selected = 0")
    assert sorted((p["chosen_id"], p["rejected_id"]) for p in offered) == sorted(
        (r["id"], r["parent_id"]) for r in revisions)
    # the judges configured after it scored the revisions too, each under its own label
    judged = {(x["judge"], x["candidate_id"]) for x in q(db, "select judge, candidate_id from judgments")}
    for rev in revisions:
        assert ("self_reward", rev["id"]) in judged
    assert {x["judge"] for x in q(db, "select distinct judge from judgments")} == {"self_reward", "cai_pref"}


def test_pairs_compare_candidates_scored_by_the_same_judges(run_dir):
    """The combine rule (loop/combine.py): both sides of every selector pair were scored by
    the same judges, and the stored scores are the weighted mean of their z-scores; a
    candidate missing a judge of its prompt is counted in select/ineligible, never paired."""
    from loop.combine import combine

    db = run_dir / "run.db"
    weights = {"self_reward": 1.0, "cai_pref": 0.5}
    for r in (1, 2):
        rows = q(db, "select j.candidate_id, c.prompt_id, j.judge, j.score from judgments j "
                     "join candidates c on c.id = j.candidate_id where j.round = ?", [r])
        scores, ineligible = combine([tuple(x.values()) for x in rows], weights, "zscore")
        judges = {}
        for x in rows:
            if x["score"] is not None:
                judges.setdefault(x["candidate_id"], set()).add(x["judge"])
        m = {x["name"]: x["value"] for x in q(db, "select name, value from metrics where round = ?", [r])}
        assert m["select/ineligible"] == len(ineligible)
        pairs = q(db, "select * from pairs where round = ? and selected = 1 and source = 'selector'", [r])
        assert pairs
        for pair in pairs:
            assert judges[pair["chosen_id"]] == judges[pair["rejected_id"]]
            assert pair["chosen_id"] not in ineligible and pair["rejected_id"] not in ineligible
            assert pair["chosen_score"] == pytest.approx(scores[pair["chosen_id"]])
            assert pair["rejected_score"] == pytest.approx(scores[pair["rejected_id"]])


def test_judge_quality_figures_per_round(run_dir):
    db = run_dir / "run.db"
    mixed = {}
    for r in (1, 2):
        verdicts = {}
        for row in q(db, "select c.text, p.text as prompt, c.prompt_id from candidates c join "
                         "prompts p on p.id = c.prompt_id where c.round = ?", [r]):
            verdicts.setdefault(row["prompt_id"], set()).add(task.verify(row["prompt"], row["text"]))
        mixed[r] = any(len(v) == 2 for v in verdicts.values())
    for r in (1, 2):
        m = {x["name"]: x["value"] for x in q(db, "select name, value from metrics where round = ?", [r])}
        for label in ("self_reward", "cai_pref"):
            assert 0 <= m[f"judge/{label}/parse_failure_rate"] <= 1
            assert -1 <= m[f"judge/{label}/length_corr"] <= 1
            # scale-free agreement with the verifier, where a prompt has right and wrong answers
            assert (f"judge/{label}/verifier_auc" in m) == mixed[r]
            assert 0 <= m.get(f"judge/{label}/verifier_auc", 0) <= 1
        assert m["judge/self_reward/score_spread"] >= 0  # two samples per candidate
        assert -0.5 <= m["judge/cai_pref/position_bias"] <= 0.5
        assert 0 <= m["judge/cai_pref/order_agreement"] <= 1
        assert m["select/length_ratio"] > 0
        # the runner's pooled figures are still there, over both judges
        n = q(db, "select count(*) as n from judgments where round = ?", [r])[0]["n"]
        assert m["judge/judgments"] == n
