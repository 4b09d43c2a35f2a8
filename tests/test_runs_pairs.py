"""Two rounds of the tiny world with the pair updaters: DPO (IPO loss) and ORPO; each must
gain held-out accuracy (tests/world_runs.py)."""

from __future__ import annotations

from world_runs import check_gain, check_two_rounds, q, run_world


def test_dpo_ipo_two_rounds(world_runs_dir):
    run = run_world(world_runs_dir, "dpo-ipo", 'name="pairs"', 'name="dpo", loss="ipo", beta=0.5')
    db = check_two_rounds(run, "rewards/margin")
    assert q(db, "select count(*) n from pairs where round = 1 and selected = 1")[0]["n"] > 0
    # the reference log-probs of each round were stored in the run folder
    assert sorted(p.name for p in (run / "cache").iterdir()) == [
        "ref-round-1-pairs.safetensors", "ref-round-2-pairs.safetensors"]
    # reference = "previous": round 1 against the base model, round 2 against round 1's policy
    assert [r["reference"] for r in q(db, "select reference from rounds order by round")] == [
        None, "base", "round-1"]
    check_gain(db, 5)


def test_orpo_two_rounds(world_runs_dir):
    db = check_two_rounds(run_world(world_runs_dir, "orpo", 'name="pairs"', 'name="orpo", lam=0.1'),
                          "rewards/margin")
    assert {r["reference"] for r in q(db, "select reference from rounds")} == {None}  # no reference
    check_gain(db, 5)
