"""OPRO's history lives in the run database: a run killed inside round 2's optimise phase
and resumed stores the same instructions (and system instructions) as an uninterrupted one.

Model-free: the fake generator proposes instructions and writes answers, the fake judge
scores them (tests/plugins/fake.py).
"""

from __future__ import annotations

import subprocess

from tests.core_helpers import (
    cli_inprocess,
    cli_popen,
    count,
    phase_status,
    rows,
    run_inprocess,
    sigkill,
    wait_for_phase,
    write_config,
)

OPRO = '[[optimisers]]\nname = "opro"\nsteps = 2\nproposals = 3\nscore_prompts = 4\n' \
       'answer_max_new_tokens = 8\njudge = { name = "fake", samples = 1 }\n'
CONFIG = dict(rounds=2, per_round=5, n=2, generator={"sleep": 0.02}, extra=OPRO)
SQL = "select round, optimiser, step, text, score, scored_on, chosen, meta from instructions order by id"


def test_opro_history_survives_a_kill_and_resume(tmp_path):
    ref = run_inprocess(write_config(tmp_path / "ref.toml", tmp_path / "ref", **CONFIG))
    expected = rows(ref / "run.db", SQL)
    assert {r["round"] for r in expected} == {1, 2} and all(r["optimiser"] == "opro" for r in expected)
    # Round 2 starts from round 1's choice, and its meta-prompt history reads round 1's rows.
    chosen1 = [r["text"] for r in expected if r["round"] == 1 and r["chosen"]]
    assert [r["text"] for r in expected if r["round"] == 2 and r["step"] == 0] == chosen1
    for r in (1, 2):
        [chosen] = [x for x in expected if x["round"] == r and x["chosen"]]
        systems = rows(ref / "run.db", "select distinct system from round_prompts where round = ?", [r])
        assert systems == [{"system": chosen["text"] or None}]

    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.toml", runs, **CONFIG)
    db = runs / "fake" / "run.db"
    proc = cli_popen("run", str(config), "--progress", "off")
    wait_for_phase(proc, db, 2, "optimise")
    try:
        proc.wait(timeout=0.05)
    except subprocess.TimeoutExpired:
        pass
    sigkill(proc)
    assert phase_status(db, 2, "optimise") == "running"
    assert count(db, "select count(*) from instructions where round = 2") == 0
    final = cli_inprocess("resume", str(runs / "fake"), "--progress", "off")
    assert final.exit_code == 0, final.stderr[-3000:]
    assert rows(db, SQL) == expected
    assert rows(db, "select round, position, prompt_id, system from round_prompts order by round, position") \
        == rows(ref / "run.db", "select round, position, prompt_id, system from round_prompts order by round, position")
