"""Resume inside the update phase, for real: SIGKILL ``python -m loop run`` while round 1
trains (after its reference log-probs are stored), resume it, and compare the adapter
with an uninterrupted run's, byte for byte; the resumed round reads the stored
reference log-probs instead of recomputing them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from world_runs import ENV, ROOT, q, run_world_subprocess, world_command

ARGS = ('name="pairs"', 'name="dpo"', "--set", "rounds=1")


def update_running(run_dir) -> bool:
    db = run_dir / "run.db"
    if not db.is_file() or not (run_dir / "cache" / "ref-round-1-pairs.safetensors").is_file():
        return False
    try:
        rows = q(db, "select status from phases where round = 1 and phase = 'update'")
    except Exception:  # the database is being created
        return False
    return bool(rows) and rows[0]["status"] == "running"


def metric(run_dir, name):
    return q(run_dir / "run.db", "select value from metrics where round = 1 and name = ?", [name])[0]["value"]


def test_killed_update_resumes_to_the_same_adapter(world_runs_dir):
    whole = run_world_subprocess(world_runs_dir, "whole", *ARGS, max_steps=30)
    killed = world_runs_dir / "killed"
    proc = subprocess.Popen(world_command(world_runs_dir, "killed", *ARGS, max_steps=30), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 1500
        while not update_running(killed):
            assert proc.poll() is None, "the run ended before its update phase could be killed"
            if time.time() > deadline:  # a hang guard, not a speed check
                pytest.fail("the run never reached its update phase")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "adapters" / "round-1").exists()
    resumed = subprocess.run([sys.executable, "-m", "loop", "resume", str(killed), "--progress", "plain"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        a = (whole / "adapters" / "round-1" / f).read_bytes()
        b = (killed / "adapters" / "round-1" / f).read_bytes()
        if f == "adapter_config.json":  # records the model path, the same in both runs
            a, b = a.replace(str(whole).encode(), b""), b.replace(str(killed).encode(), b"")
        assert a == b, f
    assert metric(whole, "train/ref_cache_hit") == 0.0
    assert metric(killed, "train/ref_cache_hit") == 1.0
    events = q(killed / "run.db", "select message from events where round = 1")
    assert any("reference log-probs read from the run's cache" in e["message"] for e in events)
