"""THE kill test: SIGKILL a real ``python -m loop run`` at several points, resume it (maybe
several times), and compare the final run with an uninterrupted one.

The fake components are slowed down (generator / judge / updater ``sleep`` options) so the
test can find each phase running by polling the run database read-only, then kill. A kill
inside a database commit uses the fake plugin's ``FAKE_KILL_ON_SQL`` (the process
SIGKILLs itself when the n-th matching SQL statement starts, mid-transaction).

What must be equal: every table but ``events`` (the log of what happened, kills included),
row for row, ids included (a phase's rows are committed in one transaction, so a killed
attempt leaves no rows and consumes no ids), minus the columns that record time or
attempts; and the adapter folders, file for file, byte for byte.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.core_helpers import (
    cli_inprocess,
    cli_popen,
    count,
    db_snapshot,
    phase_status,
    rows,
    run_inprocess,
    sigkill,
    tree_snapshot,
    wait_for_phase,
    write_config,
)

# Each slowed phase lasts over a second, so a kill lands inside it even on a loaded machine.
SLOW = dict(rounds=2, per_round=5, n=4, generator={"sleep": 0.25}, judge={"sleep": 0.06},
            updater={"sleep": 0.4})
JUDGMENTS = 'INSERT INTO "judgments"'  # the text Store.batch emits, once per row (loop/store.py _SQL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of the same config, in another folder."""
    tmp = tmp_path_factory.mktemp("reference")
    runs = tmp / "runs"
    run_dir = run_inprocess(write_config(tmp / "c.toml", runs, **SLOW))
    return run_dir, runs


def snapshot(run_dir: Path, runs: Path):
    return db_snapshot(run_dir / "run.db", replace={str(runs): "<RUNS>"}), tree_snapshot(run_dir / "adapters", {str(runs): "<RUNS>"})


def assert_same(ref: dict, got: dict) -> None:
    assert sorted(ref) == sorted(got)
    for table in ref:
        a, b = ref[table], got[table]
        assert a["columns"] == b["columns"], table
        assert a["count"] == b["count"], f"{table}: {b['count']} rows, uninterrupted run has {a['count']}"
        if a["sha256"] != b["sha256"]:
            diff = next((x, y) for x, y in zip(a["rows"], b["rows"]) if x != y)
            raise AssertionError(f"{table} differs: uninterrupted {diff[0]} vs resumed {diff[1]}")


# A kill is (round, phase): kill when that phase is running; or ("sql", "TEXT:N"): the process
# kills itself when the N-th statement containing TEXT starts.
SCENARIOS = {
    "generate": [(2, "generate")],
    "judge": [(2, "judge")],
    "update": [(2, "update")],
    "judge-commit": [("sql", f"{JUDGMENTS}:30")],  # the 30th of round 1's 40 judgment inserts
    # several kills in a row: after round 1's adapter is installed but before its update
    # commits; then the resumed process is killed while judging round 2.
    "update-commit-then-judge": [("sql", "update rounds set policy:1"), (2, "judge")],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kill_and_resume_ends_like_an_uninterrupted_run(tmp_path, reference, name):
    ref_dir, ref_runs = reference
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.toml", runs, **SLOW)
    run_dir = runs / "fake"
    db = run_dir / "run.db"

    for i, (where, what) in enumerate(SCENARIOS[name]):
        args = ("run", str(config)) if i == 0 else ("resume", str(run_dir))
        if where == "sql":
            proc = cli_popen(*args, "--progress", "off", FAKE_KILL_ON_SQL=what)
            proc.communicate(timeout=120)
            assert proc.returncode == -9, f"the process was to kill itself on {what}"
            _check_killed_in_commit(run_dir, what)
        else:
            proc = cli_popen(*args, "--progress", "off")
            wait_for_phase(proc, db, where, what)
            try:
                proc.wait(timeout=0.05)  # let it get into the phase's work
            except subprocess.TimeoutExpired:
                pass
            sigkill(proc)
            assert phase_status(db, where, what) == "running", "killed after the phase ended"
            # Nothing of the killed phase is stored.
            table = {"generate": "candidates", "judge": "judgments", "update": "train_steps"}[what]
            assert count(db, f"select count(*) from {table} where round = ?", [where]) == 0
        assert (run_dir / "lock").exists()  # a stale lock file, left by the dead process

    # The last resume runs in this process (CliRunner: the same command, without paying for
    # a fresh interpreter); the kills above were of real `python -m loop run/resume` processes.
    final = cli_inprocess("resume", str(run_dir), "--progress", "plain")
    assert final.exit_code == 0, final.stderr[-3000:]
    assert "resuming run fake" in final.stderr
    assert rows(db, "select status from runs")[0]["status"] == "completed"
    retried = rows(db, "select round, phase, attempt from phases where attempt > 1")
    assert len(retried) == len(SCENARIOS[name])
    assert count(db, "select count(*) from events where message like 're-running % from scratch%'") == len(retried)

    ref_db, ref_adapters = snapshot(ref_dir, ref_runs)
    got_db, got_adapters = snapshot(run_dir, runs)
    assert_same(ref_db, got_db)
    assert got_adapters == ref_adapters
    assert sorted(got_adapters) == ["round-1/", "round-1/README.md", "round-1/adapter_config.json",
                                    "round-1/adapter_model.safetensors", "round-2/", "round-2/README.md",
                                    "round-2/adapter_config.json", "round-2/adapter_model.safetensors"]
    # The saved config is the run's own, unchanged by the kills.
    assert json.loads((run_dir / "config.json").read_text())["generator"]["sleep"] == SLOW["generator"]["sleep"]


def _check_killed_in_commit(run_dir: Path, what: str) -> None:
    db = run_dir / "run.db"
    if what.startswith(JUDGMENTS):
        # 29 inserts ran inside the judge phase's transaction; none of them survived.
        assert phase_status(db, 1, "judge") == "running"
        assert count(db, "select count(*) from judgments") == 0
        assert count(db, "select count(*) from candidates where round = 1") == 20
    else:
        # The adapter folder was installed, the commit that records it never happened.
        assert phase_status(db, 1, "update") == "running"
        assert (run_dir / "adapters" / "round-1" / "adapter_config.json").is_file()
        assert rows(db, "select policy from rounds where round = 1")[0]["policy"] is None
        assert count(db, "select count(*) from train_steps") == 0


def test_snapshot_comparison_can_fail(tmp_path, reference):
    """The comparison is not vacuous: a run with another seed differs, ids included."""
    ref_dir, ref_runs = reference
    runs = tmp_path / "runs"
    fast = dict(SLOW, generator={}, judge={}, updater={})
    other = run_inprocess(write_config(tmp_path / "c.toml", runs, **fast), "--set", "seed=8")
    got_db, _ = snapshot(other, runs)
    ref_db, _ = snapshot(ref_dir, ref_runs)
    with pytest.raises(AssertionError):
        assert_same(ref_db, got_db)
    assert got_db["prompts"]["sha256"] != ref_db["prompts"]["sha256"]


def test_ctrl_c_stops_after_the_phase_and_resume_ends_the_same(tmp_path, reference):
    """One SIGINT (Ctrl-C): the current phase finishes and commits, the run stops with exit
    code 130 and status "interrupted"; resume then ends like the uninterrupted run."""
    ref_dir, ref_runs = reference
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.toml", runs, **SLOW)
    run_dir = runs / "fake"
    db = run_dir / "run.db"
    proc = cli_popen("run", str(config), "--progress", "plain")
    wait_for_phase(proc, db, 2, "generate")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"selfloop resume {run_dir}" in err.strip().splitlines()[-1]
    assert phase_status(db, 2, "generate") == "done"  # the phase in flight was finished
    assert phase_status(db, 2, "judge") is None
    assert rows(db, "select status from runs")[0]["status"] == "interrupted"
    final = cli_inprocess("resume", str(run_dir), "--progress", "off")
    assert final.exit_code == 0, final.stderr
    assert rows(db, "select count(*) n from phases where attempt > 1")[0]["n"] == 0
    ref_db, ref_adapters = snapshot(ref_dir, ref_runs)
    got_db, got_adapters = snapshot(run_dir, runs)
    assert_same(ref_db, got_db)
    assert got_adapters == ref_adapters
