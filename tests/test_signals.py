"""SIGTERM and SIGHUP (what Kubernetes, systemd and SLURM send) are handled like Ctrl-C,
and readers tell a dead writer from a live one. Real ``python -m loop run`` processes,
real signals; the fake components are slowed so a signal lands inside a phase.
"""

from __future__ import annotations

import json
import os
import signal
import time

from tests.core_helpers import (cli, cli_inprocess, cli_popen, count, db_snapshot, rows,
                                run_inprocess, sigkill, wait_for_phase, write_config)

SLOW = dict(rounds=1, per_round=4, n=2, generator={"sleep": 0.4})


def _start(tmp_path, **kw):
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", **{**SLOW, **kw})
    proc = cli_popen("run", str(config), "--progress", "plain")
    run_dir = tmp_path / "runs" / "fake"
    wait_for_phase(proc, run_dir / "run.db", 1, "generate")
    return proc, run_dir


def test_sigterm_stops_after_the_phase_marks_interrupted_and_resume_equals(tmp_path):
    proc, run_dir = _start(tmp_path)
    db = run_dir / "run.db"
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last == f"Error: stopped by SIGTERM; `selfloop resume {run_dir}` continues where it stopped"
    assert "Traceback" not in err and "SIGTERM: stopping after the current phase" in out + err
    # the safe point: generate finished and committed, judge never started
    assert rows(db, "select status from runs")[0]["status"] == "interrupted"
    assert rows(db, "select status from phases where round = 1 and phase = 'generate'") == [
        {"status": "done"}]
    assert count(db, "select count(*) from phases where round = 1 and phase = 'judge'") == 0
    assert count(db, "select count(*) from candidates") == 4 * 2
    resumed = cli_inprocess("resume", str(run_dir), "--progress", "off", "--set", "generator.sleep=0.0")
    assert resumed.exit_code == 0, resumed.stderr
    # equal to an uninterrupted run of the same config (elsewhere), row for row
    ref_dir = run_inprocess(write_config(tmp_path / "ref.toml", tmp_path / "ref", **{
        **SLOW, "generator": {"sleep": 0.0}}))
    a = db_snapshot(ref_dir / "run.db", replace={str(tmp_path / "ref"): "<RUNS>"})
    b = db_snapshot(db, replace={str(tmp_path / "runs"): "<RUNS>"})
    a.pop("runs"), b.pop("runs")  # config.json differs in generator.sleep, nothing else
    assert {t: v["sha256"] for t, v in a.items()} == {t: v["sha256"] for t, v in b.items()}


def test_a_second_sighup_stops_now_and_the_phase_reruns(tmp_path):
    proc, run_dir = _start(tmp_path, generator={"sleep": 5.0})
    db = run_dir / "run.db"
    os.kill(proc.pid, signal.SIGHUP)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert err.strip().splitlines()[-1].startswith("Error: stopped by SIGHUP; `selfloop resume")
    assert rows(db, "select status from runs")[0]["status"] == "interrupted"
    (ph,) = rows(db, "select status, error from phases where round = 1 and phase = 'generate'")
    assert ph == {"status": "interrupted", "error": "interrupted by SIGHUP"}
    assert count(db, "select count(*) from candidates") == 0  # nothing half-committed
    resumed = cli_inprocess("resume", str(run_dir), "--progress", "off", "--set", "generator.sleep=0.0")
    assert resumed.exit_code == 0, resumed.stderr
    assert rows(db, "select attempt from phases where round = 1 and phase = 'generate'") == [{"attempt": 2}]


def test_readers_tell_a_dead_writer_from_a_live_one(tmp_path):
    proc, run_dir = _start(tmp_path, generator={"sleep": 2.0})
    try:
        live = json.loads(cli_inprocess("status", str(run_dir), "--json").stdout)
        assert live["status"] == "running" and live["note"] is None
        assert live["per_round"][1]["phases"]["generate"]["status"] == "running"
    finally:
        sigkill(proc)
    dead = json.loads(cli_inprocess("status", str(run_dir), "--json").stdout)
    note = (f"{run_dir}: its writer (pid {proc.pid}) is gone without recording its end; "
            f"`selfloop resume {run_dir}` continues it")
    assert (dead["status"], dead["stored_status"], dead["note"]) == ("interrupted", "running", note)
    assert dead["per_round"][1]["phases"]["generate"]["status"] == "interrupted"
    table = cli_inprocess("status", str(run_dir))
    assert "fake [interrupted]" in table.stdout and "is gone without" in table.stdout
    # watch exits on a dead run (it used to poll forever), saying why, exit 1
    watched = cli("watch", str(run_dir), "--interval", "0.1", timeout=60)
    assert watched.returncode == 1 and "is gone without recording its end" in watched.stdout
