"""The prompt-side demos end to end on the tiny model: configs/opro_demo.toml and
configs/bpo_demo.toml, two rounds each, with the demo test's shortened settings (conftest's
``DEMO_SHORT``, the same seed model), so each is the demo run plus one optimiser.

The tiny model only knows its task's words, so its instructions and rewrites are rarely
better; what is checked is the mechanics (what is stored, linked and measured) and that
the gates keep a run from getting worse: each ends within 3 points of held-out accuracy of
the same run without the optimiser (conftest's ``demo_run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DEMO_SHORT
from tests.core_helpers import run_inprocess
from tests.test_demo import q

ROOT = Path(__file__).resolve().parent.parent



def run_config(runs: Path, config: str, *extra: str) -> Path:
    """``selfloop run configs/CONFIG`` in this process (no second torch import), as the demo
    test's run: the shortened recipe, two rounds."""
    return run_inprocess(ROOT / "configs" / config, "--set", f"runs_dir={runs}", *DEMO_SHORT,
                         "--set", "rounds=2", *extra)


def check_not_worse(db: Path, demo_run, points: float = 3.0):
    """The run ends within ``points`` of the same run without its optimiser (never far worse)."""
    from world_runs import accuracy

    mine, demo = accuracy(db), accuracy(demo_run[0] / "run.db")
    assert len(mine) == len(demo) == 3
    assert mine[-1] >= demo[-1] - points, (
        f"{db.parent.name}: held-out accuracy by round {mine}; the same run without the "
        f"optimiser {demo}: more than {points} points worse at the end")
    return mine, demo


def test_opro_demo_two_rounds(world_runs_dir, demo_run):
    run_dir = run_config(world_runs_dir, "opro_demo.toml", "--set", "optimisers.0.score_prompts=2",
                         "--set", "optimisers.0.proposals=2", "--set", "optimisers.0.max_new_tokens=12")
    db = run_dir / "run.db"
    assert q(db, "select status from runs")[0]["status"] == "completed"
    ins = q(db, "select * from instructions order by id")
    assert {r["round"] for r in ins} == {1, 2}
    for r in (1, 2):
        rows = [x for x in ins if x["round"] == r]
        assert sum(x["chosen"] for x in rows) == 1
        chosen = next(x for x in rows if x["chosen"])
        scored = [x["score"] for x in rows if x["score"] is not None]
        if scored:
            assert chosen["score"] == max(scored)
        systems = {x["system"] for x in q(db, "select system from round_prompts where round = ?", [r])}
        assert systems == {chosen["text"] or None}
        metrics = {m["name"]: m["value"] for m in q(db, "select * from metrics where round = ?", [r])}
        if scored:
            assert metrics["opro/best_score"] == chosen["score"]
            assert metrics["opro/mean_score"] == pytest.approx(sum(scored) / len(scored))
    # Round 2 starts from round 1's choice, re-scored (step 0), and no instruction (baseline).
    first = next(x for x in ins if x["round"] == 1 and x["chosen"])
    assert [x["text"] for x in ins if x["round"] == 2 and x["step"] == 0] == list(
        dict.fromkeys([first["text"], ""]))
    # The chosen instruction is the deployed system prompt the evaluator answered with.
    for r in (1, 2):
        chosen = next(x for x in ins if x["round"] == r and x["chosen"])
        assert q(db, "select system from rounds where round = ?", [r])[0]["system"] == (chosen["text"] or None)
    check_not_worse(db, demo_run)


def test_bpo_demo_two_rounds(world_runs_dir, demo_run):
    run_dir = run_config(world_runs_dir, "bpo_demo.toml", "--set", "optimisers.0.train.max_steps=2",
                         "--set", "optimisers.0.max_new_tokens=8",
                         "--set", "optimisers.0.rewrite_max_new_tokens=8")
    db = run_dir / "run.db"
    assert q(db, "select status from runs")[0]["status"] == "completed"
    adapter = run_dir / "adapters" / "bpo-round-2"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert not (run_dir / "adapters" / "bpo-round-1").exists()  # no pairs before round 1
    train = q(db, "select * from prompts where round = 2 and json_extract(meta, '$.bpo') = 'train'")
    pair_prompts = {r["prompt_id"] for r in q(db, "select prompt_id from pairs where round = 1 and selected = 1")}
    assert train and all(t["kind"] == "rewrite" and t["parent_id"] in pair_prompts for t in train)
    answered = q(db, """select pr.* from round_prompts rp join prompts pr on pr.id = rp.prompt_id
                        where rp.round = 2 order by rp.position""")
    rewrites = [p for p in answered if p["kind"] == "rewrite"]
    originals = {p["id"] for p in answered if p["kind"] == "original"}
    assert len(originals) == 24  # keep_original: every original is still answered
    assert all(r["parent_id"] in originals for r in rewrites)
    assert all(json.loads(r["meta"])["adapter"] == "adapters/bpo-round-2" for r in rewrites)
    m1 = {m["name"]: m["value"] for m in q(db, "select * from metrics where round = 1")}
    m2 = {m["name"]: m["value"] for m in q(db, "select * from metrics where round = 2")}
    assert m1["bpo/rewrite_rate"] == 0.0
    # The gate: one decision per rewritten prompt; the kept ones are exactly those answered.
    decisions = q(db, "select * from rewrite_decisions where round = 2")
    assert m2["bpo/rewrite_rate"] == len(decisions) / 24
    assert {d["rewrite_id"] for d in decisions if d["kept"]} == {r["id"] for r in rewrites}
    assert m2["bpo/accepted_rate"] == pytest.approx(len(rewrites) / max(len(decisions), 1))
    for d in decisions:
        assert d["reason"] in ("better", "not better", "unscored", "rewriter rejected")
        if d["kept"]:
            assert d["reason"] == "better" and d["rewrite_score"] > d["original_score"]
    if decisions:
        sample = [d for d in decisions if d["validation"]]
        assert 0 < len(sample) <= 16 and "bpo/adopted" in m2
    if rewrites:
        assert "bpo/score_delta" in m2 and m2["bpo/compared"] >= 1
    check_not_worse(db, demo_run)
