"""A full disk, for real: the run folder lives on a small tmpfs (``mount -t tmpfs -o
size=16m``, unmounted in teardown), and the test fills it while a real ``python -m loop
run`` writes there. tmpfs gives the real ENOSPC and SQLite's real "database or disk is
full"; RLIMIT_FSIZE would not (it raises EFBIG and SIGXFSZ instead), so this needs root
and is skipped, saying so, where mounting is not permitted.

Each time: one line naming the folder and what to do, no traceback, the database intact
and truthful, and after freeing space a resume that ends equal to an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.core_helpers import (cli, cli_inprocess, cli_popen, db_snapshot, ro_connect, rows,
                                run_inprocess, wait_for_phase, write_config)

SLOW = dict(rounds=1, per_round=5, n=2, generator={"sleep": 0.3}, judge={"sleep": 0.05},
            updater={"sleep": 0.4})


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full tests need a small tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a 16 MiB tmpfs is not permitted here ({proc.stderr.strip()}); "
                    "the disk-full tests need root or CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("df-reference")
    run_dir = run_inprocess(write_config(tmp / "c.toml", tmp / "runs", **SLOW))
    return db_snapshot(run_dir / "run.db", replace={str(tmp / "runs"): "<RUNS>"})


def fill(folder: Path, leave: int = 0, name: str = "filler") -> Path:
    """Write a filler file until the filesystem is full, then free ``leave`` bytes."""
    path = folder / name
    block = b"\xff" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        try:  # the last partial pages
            while True:
                f.write(b"\xff" * 4096)
        except OSError:
            pass
    if leave:
        os.truncate(path, os.path.getsize(path) - leave)
    return path


def assert_one_line_and_truthful(proc_err: str, run_dir: Path) -> None:
    assert "Traceback" not in proc_err, proc_err[-3000:]
    last = proc_err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"Error: {re.escape(str(run_dir))}: no space left on the device while .+; free space "
        rf"there \(df -h {re.escape(str(run_dir))}\), then `selfloop resume {re.escape(str(run_dir))}` .+",
        last), last
    conn = ro_connect(run_dir / "run.db")
    try:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    shown = json.loads(cli_inprocess("status", str(run_dir), "--json").stdout)
    assert shown["status"] in ("failed", "interrupted") and shown["status"] != "running"
    phases = [ph for r in shown["per_round"] for ph in r["phases"].values()]
    assert not any(ph["status"] == "running" for ph in phases)


@pytest.mark.parametrize("phase,leave", [("generate", 0), ("judge", 24 * 1024), ("update", 0)])
def test_disk_full_inside_a_phase(small_fs, reference, tmp_path, phase, leave):
    runs = small_fs / "runs"
    config = write_config(tmp_path / "c.toml", runs, **SLOW)
    proc = cli_popen("run", str(config), "--progress", "off")
    run_dir = runs / "fake"
    wait_for_phase(proc, run_dir / "run.db", 1, phase, timeout=120)
    filler = fill(small_fs, leave)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert_one_line_and_truthful(err, run_dir)
    # The reserve gave the runner room to record it: the run and the phase say failed, why.
    assert rows(run_dir / "run.db", "select status from runs")[0]["status"] == "failed"
    (failed,) = rows(run_dir / "run.db", "select phase, error from phases where status = 'failed'")
    assert "no space left on the device" in failed["error"]
    filler.unlink()
    resumed = cli_inprocess("resume", str(run_dir), "--progress", "off")
    assert resumed.exit_code == 0, resumed.stderr
    got = db_snapshot(run_dir / "run.db", replace={str(runs): "<RUNS>"})
    assert {t: v["sha256"] for t, v in got.items()} == {t: v["sha256"] for t, v in reference.items()}
    assert not (run_dir / ".reserve").exists()


def test_disk_full_before_a_resume_starts_changes_nothing(small_fs, reference, tmp_path):
    runs = small_fs / "runs"
    config = write_config(tmp_path / "c.toml", runs, **SLOW)
    proc = cli_popen("run", str(config), "--progress", "off")
    run_dir = runs / "fake"
    wait_for_phase(proc, run_dir / "run.db", 1, "judge", timeout=120)
    proc.kill()
    proc.communicate(timeout=60)
    before = db_snapshot(run_dir / "run.db")
    filler = fill(small_fs)
    again = cli("resume", str(run_dir), "--progress", "off")
    assert again.returncode == 1
    assert_one_line_and_truthful(again.stderr, run_dir)
    assert db_snapshot(run_dir / "run.db") == before  # nothing written, nothing lost
    # a new run on the full disk: one line, no half-made run folder
    more = fill(small_fs, name="filler2")  # (the refused resume freed its reserve's pages)
    other = cli("run", str(config), "--progress", "off", "--set", "name=other")
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"Error: {runs}: no space left on the device while creating the run folder other")
    assert sorted(p.name for p in runs.iterdir()) == [".cache", "fake"]
    filler.unlink()
    more.unlink()
    resumed = cli_inprocess("resume", str(run_dir), "--progress", "off")
    assert resumed.exit_code == 0, resumed.stderr
    got = db_snapshot(run_dir / "run.db", replace={str(runs): "<RUNS>"})
    assert {t: v["sha256"] for t, v in got.items()} == {t: v["sha256"] for t, v in reference.items()}
