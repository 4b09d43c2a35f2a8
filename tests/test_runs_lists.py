"""Two rounds of the tiny world with the ranked-list updaters: RRHF and PRO; each must gain
held-out accuracy (tests/world_runs.py)."""

from __future__ import annotations

from world_runs import check_gain, check_two_rounds, q, run_world


def test_rrhf_two_rounds(world_runs_dir):
    db = check_two_rounds(run_world(world_runs_dir, "rrhf", 'name="ranked"', 'name="rrhf"'), "rank/margin")
    rows = q(db, "select label, rank, group_key from selected where round = 1")
    assert rows and {r["label"] for r in rows} == {"ranked"} and min(r["rank"] for r in rows) == 0
    check_gain(db, 5)


def test_pro_two_rounds(world_runs_dir):
    db = check_two_rounds(run_world(world_runs_dir, "pro", 'name="ranked"', 'name="pro", sft_weight=0.5'),
                          "rank/accuracy")
    check_gain(db, 5)
