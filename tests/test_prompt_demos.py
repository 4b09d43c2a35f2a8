"""The prompt-side demos end to end on the tiny model: configs/opro_demo.toml and
configs/bpo_demo.toml, two rounds each, with a shortened recipe (as tests/test_demo.py).

The tiny model only knows its task's words, so these check the mechanics (what is stored,
linked and measured), not that instructions or rewrites get better.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.core_helpers import run_inprocess
from tests.test_demo import q

ROOT = Path(__file__).resolve().parent.parent

# A smaller, briefly trained seed model (built once for both tests: they share runs_dir and
# so the model cache): enough for the judge to write parseable scores most of the time.
SHORT = [
    "--set", "model.build.steps=150",
    "--set", "model.build.hidden_size=64",
    "--set", "model.build.layers=2",
    "--set", "model.build.intermediate_size=128",
    "--set", "model.build.batch_size=16",
    "--set", "rounds=2",
    "--set", "prompts.0.per_round=8",
    "--set", "generate.n=2",
    "--set", "evaluators.0.heldout=8",
    "--set", "updater.max_steps=2",
    "--set", "updater.batch_size=8",
    "--set", "judges.0.samples=1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("prompt-demos") / "runs"  # one model cache for both


def run_config(runs: Path, config: str, *extra: str) -> Path:
    """``selfloop run configs/CONFIG`` in this process (no second torch import)."""
    return run_inprocess(ROOT / "configs" / config, "--set", f"runs_dir={runs}", *SHORT, *extra)


def test_opro_demo_two_rounds(runs):
    run_dir = run_config(runs, "opro_demo.toml", "--set", "optimisers.0.score_prompts=2",
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
    # Round 2 starts from round 1's choice, re-scored (step 0).
    first = next(x for x in ins if x["round"] == 1 and x["chosen"])
    assert [x["text"] for x in ins if x["round"] == 2 and x["step"] == 0] == [first["text"]]


def test_bpo_demo_two_rounds(runs):
    run_dir = run_config(runs, "bpo_demo.toml", "--set", "optimisers.0.train.max_steps=2",
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
    assert len(originals) == 8  # keep_original: every original is still answered
    assert all(r["parent_id"] in originals for r in rewrites)
    assert all(json.loads(r["meta"])["adapter"] == "adapters/bpo-round-2" for r in rewrites)
    m1 = {m["name"]: m["value"] for m in q(db, "select * from metrics where round = 1")}
    m2 = {m["name"]: m["value"] for m in q(db, "select * from metrics where round = 2")}
    assert m1["bpo/rewrite_rate"] == 0.0
    assert m2["bpo/rewrite_rate"] == len(rewrites) / 8
    if rewrites:
        assert "bpo/score_delta" in m2 and m2["bpo/compared"] >= 1
