"""Two rounds of the tiny world with RAFT (top_k selector) and KTO (labels selector); each
must gain held-out accuracy (tests/world_runs.py)."""

from __future__ import annotations

from world_runs import check_gain, check_two_rounds, q, run_world


def test_raft_two_rounds(world_runs_dir):
    db = check_two_rounds(run_world(world_runs_dir, "raft", 'name="top_k", k=1', 'name="raft"'), "train/nll")
    assert {r["label"] for r in q(db, "select label from selected where round = 1")} == {"top"}
    check_gain(db, 5)


def test_kto_two_rounds(world_runs_dir):
    run = run_world(world_runs_dir, "kto", 'name="kto"', 'name="kto", beta=0.1, reference="base"')
    db = check_two_rounds(run, "rewards/desirable")
    labels = {r["label"] for r in q(db, "select label from selected where round = 1")}
    assert labels == {"desirable", "undesirable"}
    # reference = "base": both rounds measured against the starting model
    assert [r["reference"] for r in q(db, "select reference from rounds order by round")] == [
        None, "base", "base"]
    check_gain(db, 5)
