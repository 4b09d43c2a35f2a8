"""configs/eval_demo.toml through the real CLI, three rounds (shortened: a 250-step seed
recipe, 8 prompts x 3 answers a round, one judge sample, 16 held-out prompts for tinyworld
and verify, 8 for winrate, 2 DPO steps): win rates for rounds 0..3 (round 0 against the base is 0.5 by construction:
identical greedy answers are ties, never judged), verify accuracy equal to the tinyworld
evaluator's on the same prompts, the held-out split recorded, and `report` (+ --json)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.world_runs import ENV, ROOT, q

SHORT = [
    "--set", "model.build.steps=250",
    "--set", "prompts.0.per_round=8",
    "--set", "generate.n=3",
    "--set", "judges.0.samples=1",
    "--set", "evaluators.0.heldout=16",
    "--set", "evaluators.1.heldout=16",
    "--set", "evaluators.2.heldout=8",
    "--set", "updater.max_steps=2",
    "--set", "updater.batch_size=8",
]


@pytest.fixture(scope="module")
def eval_run(world_runs_dir):
    # in this process (no second torch import); `report` below runs in a subprocess
    from tests.core_helpers import run_inprocess

    return run_inprocess(ROOT / "configs" / "eval_demo.toml", "--set", f"runs_dir={world_runs_dir}",
                         *SHORT)


def _metrics(db):
    out: dict[int, dict[str, float]] = {}
    for r in q(db, "select round, name, value from metrics"):
        out.setdefault(r["round"], {})[r["name"]] = r["value"]
    return out


def test_win_rates_every_round_and_verify_agrees_with_tinyworld(eval_run):
    m = _metrics(eval_run / "run.db")
    assert sorted(m) == [0, 1, 2, 3]
    assert m[0]["eval/winrate/winrate"] == 0.5 and m[0]["eval/winrate/lc_winrate"] == pytest.approx(0.5, abs=1e-6)
    assert m[0]["eval/winrate/ties"] == 8  # the base against itself: never judged
    for r in range(4):
        w = m[r]
        assert 0 <= w["eval/winrate/winrate_low"] <= w["eval/winrate/winrate"] <= w["eval/winrate/winrate_high"] <= 1
        assert 0 < w["eval/winrate/lc_winrate"] < 1
        assert w["eval/winrate/pairs"] + w["eval/winrate/judge_failures"] / 2 >= 8 - 1e-9
        assert w["eval/verify/accuracy"] == w["eval/accuracy"]  # the same 16 prompts, one verifier
        assert w["eval/verify/prompts"] == 16 and w["eval/verify/extract_failures"] == 0
    for r in (1, 2, 3):
        assert m[r]["select/examples"] >= 1 and "judge/self_reward/truncated_rate" in m[r]


def test_heldout_split_is_recorded_and_never_trained_on(eval_run):
    db = eval_run / "run.db"
    rows = q(db, "select evaluator, split, source, text, answer from heldout order by evaluator, position")
    assert {r["evaluator"] for r in rows} == {"verify", "winrate"}
    assert all(r["split"] == "heldout" and r["source"] == "tinyworld" and r["answer"] for r in rows)
    held = {r["text"] for r in rows}
    trained = {r["text"] for r in q(db, "select text from prompts")}
    assert trained and not held & trained
    assert all(p["answer"] for p in q(db, "select answer from prompts"))


def test_report_shows_the_evaluators(eval_run):
    proc = subprocess.run([sys.executable, "-m", "loop", "report", str(eval_run)], cwd=ROOT,
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    for header in ("win rate", "95% CI", "LC win rate", "verify", "accuracy", "parse", "examples", "train"):
        assert header in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, "-m", "loop", "report", str(eval_run), "--json"], cwd=ROOT,
                          capture_output=True, text=True, env=ENV)
    rows = json.loads(proc.stdout)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["evaluators"]["winrate"]["winrate"] == 0.5
    assert rows[3]["evaluators"]["verify"]["accuracy"] == rows[3]["accuracy"]
    assert rows[1]["examples"] >= 1 and rows[1]["train_loss"] > 0 and rows[1]["parse_failure_rate"] is not None
