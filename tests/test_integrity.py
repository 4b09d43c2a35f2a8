"""Issue 13 items 1-5 and 9, with real processes and real files: nothing a user does to a
run folder's files loses data silently.

- export never writes inside a run folder, never over a file without --force, atomically;
- the writer's exclusion survives deleting (or symlinking) ``runs/NAME/lock``;
- the database is the authority for the config: an edited config.json is refused;
- ``resume --set`` on a live run changes nothing;
- adapters are verified against the hashes recorded at install; ``--redo round-N.update``
  re-trains one and the run ends as an uninterrupted one;
- a damaged run.db / config.json / adapter is one line naming the file and the recovery.

A "stopped" run is a real ``python -m loop run`` that SIGKILLed itself (the fake plugin's
``FAKE_KILL_ON_SQL``) when round 2 began: round 1 is complete, with its adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.core_helpers import (
    cli,
    cli_inprocess,
    cli_popen,
    count,
    db_snapshot,
    rows,
    run_inprocess,
    sigkill,
    tree_snapshot,
    wait_for_phase,
    write_config,
)

CONF = dict(rounds=2, per_round=3, n=3)
ROUND_2_STARTS = 'INSERT INTO "prompts":4'  # round 1 proposes 3 prompts; the 4th is round 2's


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    runs = tmp / "runs"
    return run_inprocess(write_config(tmp / "c.toml", runs, **CONF)), runs


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run killed (SIGKILL, by itself) as round 2 began; copied by each test."""
    tmp = tmp_path_factory.mktemp("stopped")
    runs = tmp / "runs"
    config = write_config(tmp / "c.toml", runs, **CONF)
    proc = cli_popen("run", str(config), "--progress", "off", FAKE_KILL_ON_SQL=ROUND_2_STARTS)
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    run_dir = runs / "fake"
    assert rows(run_dir / "run.db", "select status from rounds where round = 1")[0]["status"] == "done"
    return run_dir, runs


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy" / "runs" / src.name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def snapshot(run_dir: Path, runs: Path):
    return (db_snapshot(run_dir / "run.db", replace={str(runs): "<RUNS>"}),
            tree_snapshot(run_dir / "adapters", {str(runs): "<RUNS>"}))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if not x.startswith("run folder: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("Error: ")
    return lines[0]


# -- 1. export ---------------------------------------------------------------------------


def test_export_never_writes_into_a_run_folder_nor_over_a_file(tmp_path, reference):
    ref_dir, _ = reference
    run_dir = copy_run(ref_dir, tmp_path)
    other_run = copy_run(ref_dir, tmp_path / "other")
    before = {p: sha(p) for p in run_dir.rglob("*") if p.is_file()}
    (tmp_path / "link.jsonl").symlink_to(run_dir / "run.db")
    refused = [
        run_dir / "run.db", run_dir / "config.json", run_dir / "new.jsonl",
        run_dir / "adapters" / "round-1" / "pairs.jsonl", tmp_path / "link.jsonl",
        other_run / "pairs.jsonl",
    ]
    for target in refused:
        result = cli_inprocess("export", str(run_dir), "-o", str(target), "--force")
        assert result.exit_code == 2, (target, result.output)
        assert "inside the run folder" in one_line(result.stderr), target
    assert {p: sha(p) for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (run_dir / "new.jsonl").exists() and not (other_run / "pairs.jsonl").exists()

    out = tmp_path / "pairs.jsonl"
    proc = cli("export", str(run_dir), "-o", str(out))  # a real process
    assert proc.returncode == 0, proc.stderr
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(pairs) == count(run_dir / "run.db", "select count(*) from pairs where selected = 1") > 0
    assert {"prompt", "chosen", "rejected"} <= set(pairs[0])

    out.write_text("keep me\n")
    proc = cli("export", str(run_dir), "-o", str(out))
    assert proc.returncode == 2
    assert "already exists" in one_line(proc.stderr) and "--force" in proc.stderr
    assert out.read_text() == "keep me\n"
    # A failing export (no such run) with --force leaves the old file and no temp file.
    result = cli_inprocess("export", str(tmp_path / "no-run"), "-o", str(out), "--force")
    assert result.exit_code == 2 and out.read_text() == "keep me\n"
    result = cli_inprocess("export", str(run_dir), "-o", str(out), "--force", "--round", "1")
    assert result.exit_code == 0
    assert all(json.loads(x)["round"] == 1 for x in out.read_text().splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "link.jsonl", "other", "pairs.jsonl"]


# -- 2 and 4. one writer, whatever happens to the lock file ------------------------------


def test_deleted_lock_does_not_admit_a_second_writer_and_resume_set_changes_nothing(
        tmp_path, reference):
    from loop.lock import writer_alive

    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.toml", runs, **CONF, generator={"sleep": 5.0})
    run_dir, db = runs / "fake", runs / "fake" / "run.db"
    proc = cli_popen("run", str(config), "--progress", "off")
    try:
        wait_for_phase(proc, db, 1, "generate", timeout=120)
        assert writer_alive(run_dir)
        (run_dir / "lock").unlink()  # what the fault campaign did
        config_bytes = (run_dir / "config.json").read_bytes()
        stored = rows(db, "select config from runs")[0]["config"]

        second = cli("resume", str(run_dir), "--progress", "off")
        assert second.returncode == 2
        assert "another selfloop process" in one_line(second.stderr)
        # 4: --set on a live run is refused before anything is rewritten.
        setting = cli_inprocess("resume", str(run_dir), "--set", "generate.n=2", "--progress", "off")
        assert setting.exit_code == 2
        assert "another selfloop process" in one_line(setting.stderr)
        assert (run_dir / "config.json").read_bytes() == config_bytes
        assert rows(db, "select config from runs")[0]["config"] == stored
        assert count(db, "select count(*) from events where message like 'config changed%'") == 0
        assert proc.poll() is None, "the first writer must still be running"
    finally:
        if proc.poll() is None:
            sigkill(proc)
    assert not writer_alive(run_dir)  # the kernel dropped the dead writer's lock

    # A symlinked lock: the resume replaces the link, never writes through it.
    precious = tmp_path / "precious.txt"
    precious.write_text("not yours\n")
    (run_dir / "lock").symlink_to(precious)
    final = cli_inprocess("resume", str(run_dir), "--progress", "off", "--set", "generator.sleep=0")
    assert final.exit_code == 0, final.stderr
    assert precious.read_text() == "not yours\n"
    assert not (run_dir / "lock").is_symlink() and json.loads((run_dir / "lock").read_text())["pid"]
    # One writer's worth of rows: 3 prompts x n=3 per round, 2 judge samples each.
    for r in (1, 2):
        assert count(db, "select count(*) from candidates where round = ?", [r]) == 9
        assert count(db, "select count(*) from judgments where round = ?", [r]) == 18
    ref_db, _ = snapshot(*reference)
    got_db, _ = snapshot(run_dir, runs)
    assert got_db["pairs"]["rows"] == ref_db["pairs"]["rows"]


# -- 3. the database is the authority for the config ---------------------------------------


def test_edited_config_json_is_refused_and_a_missing_one_is_restored(tmp_path, stopped, reference):
    run_dir = copy_run(stopped[0], tmp_path)
    db = run_dir / "run.db"
    saved = json.loads((run_dir / "config.json").read_text())
    edited = json.loads(json.dumps(saved))
    edited["seed"] = 8
    edited["generate"]["n"] = 5
    edited["judges"][0]["samples"] = 4
    (run_dir / "config.json").write_text(json.dumps(edited))
    before = db_snapshot(db)
    proc = cli("resume", str(run_dir), "--progress", "off")
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "config.json: differs from the config stored in" in line
    assert "generate.n, judges.0.samples, seed" in line and "--set" in line
    assert db_snapshot(db) == before  # nothing ran, nothing changed

    (run_dir / "config.json").unlink()  # the way out the message gives
    result = cli_inprocess("resume", str(run_dir), "--progress", "off")
    assert result.exit_code == 0, result.stderr
    assert json.loads((run_dir / "config.json").read_text()) == saved
    assert count(db, "select count(*) from events where message like 'config.json was missing%'") == 1
    ref_db, ref_adapters = snapshot(*reference)
    got_db, got_adapters = snapshot(run_dir, stopped[1])
    assert {t: v["sha256"] for t, v in got_db.items()} == {t: v["sha256"] for t, v in ref_db.items()}
    assert got_adapters == ref_adapters


def test_resume_set_is_the_logged_way_to_change_the_config(tmp_path, stopped):
    run_dir = copy_run(stopped[0], tmp_path)
    db = run_dir / "run.db"
    result = cli_inprocess("resume", str(run_dir), "--progress", "off", "--set", "generate.n=2")
    assert result.exit_code == 0, result.stderr
    stored = json.loads(rows(db, "select config from runs")[0]["config"])
    assert stored["generate"]["n"] == 2
    assert json.loads((run_dir / "config.json").read_text()) == stored
    assert count(db, "select count(*) from candidates where round = 2") == 3 * 2
    assert count(db, "select count(*) from events where message = 'config changed on resume: generate.n=2'") == 1


# -- 5. adapter hashes and --redo ------------------------------------------------------------


def test_damaged_adapter_is_caught_and_redo_retrains_it(tmp_path, stopped, reference):
    run_dir = copy_run(stopped[0], tmp_path)
    db = run_dir / "run.db"
    weights = run_dir / "adapters" / "round-1" / "adapter_model.safetensors"
    recorded = rows(db, "select file, sha256, bytes from adapter_files where adapter = 'adapters/round-1' order by file")
    assert [r["file"] for r in recorded] == ["adapter_config.json", "adapter_model.safetensors"]
    assert recorded[1]["sha256"] == sha(weights)

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bytes, same size
    weights.write_bytes(bytes(data))
    proc = cli("resume", str(run_dir), "--progress", "off")
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"{weights}: has changed since round 1's update wrote it" in line
    assert f"selfloop resume {run_dir} --redo round-1.update" in line
    assert rows(db, "select status from phases where round = 2 and phase = 'propose'")[0]["status"] == "failed"

    bad = cli_inprocess("resume", str(run_dir), "--redo", "round-1.updat", "--progress", "off")
    assert bad.exit_code == 2 and "expected round-N.PHASE" in one_line(bad.stderr)
    result = cli_inprocess("resume", str(run_dir), "--redo", "round-1.update", "--progress", "off")
    assert result.exit_code == 0, result.stderr
    assert count(db, "select count(*) from events where message like 'redo round-1.update:%'") == 1
    ref_db, ref_adapters = snapshot(*reference)
    got_db, got_adapters = snapshot(run_dir, stopped[1])
    for table in ref_db:
        assert got_db[table]["rows"] == ref_db[table]["rows"], table
    assert got_adapters == ref_adapters  # the same adapters, byte for byte


def test_redo_of_an_earlier_phase_discards_everything_after_it(tmp_path, reference):
    """On a completed run: --redo round-1.judge removes round 1's judgments, pairs, update,
    evaluation and all of round 2 in one transaction, and the resume rebuilds them equal."""
    run_dir = copy_run(reference[0], tmp_path)
    db = run_dir / "run.db"
    cache = run_dir / "cache"  # an updater's reference log-probs, keyed by round and pair ids
    cache.mkdir()
    for name in ("ref-round-1-pairs.safetensors", "ref-round-2-pairs.safetensors", "keep.bin"):
        (cache / name).write_bytes(b"x")
    result = cli_inprocess("resume", str(run_dir), "--redo", "round-1.judge", "--progress", "off")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["keep.bin"]
    attempts = {(r["round"], r["phase"]): r["attempt"] for r in rows(db, "select * from phases")}
    assert attempts[(1, "generate")] == 1 and attempts[(1, "judge")] == 1  # the row was removed
    assert count(db, "select count(*) from events where message like 'redo round-1.judge:%judgments%'") == 1
    ref_db, ref_adapters = snapshot(*reference)
    got_db, got_adapters = snapshot(run_dir, reference[1])
    for table in ref_db:
        assert got_db[table]["rows"] == ref_db[table]["rows"], table
    assert got_adapters == ref_adapters


# -- 6. a non-finite loss fails the update (and keeps failing, loudly) ----------------------


def test_non_finite_loss_fails_the_update_with_a_message(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=1, per_round=2, n=2,
                          updater={"nan_at": 1})
    run_dir = tmp_path / "runs" / "fake"
    db = run_dir / "run.db"
    for i, args in enumerate((("run", str(config)), ("resume", str(run_dir)))):
        # The first in a real process; the resume (which failed forever, silently) in this one.
        proc = cli(*args, "--progress", "off") if i == 0 else cli_inprocess(*args, "--progress", "off")
        assert (proc.returncode if i == 0 else proc.exit_code) == 1
        line = one_line(proc.stderr)
        assert "reported a non-finite loss (nan) at step 1" in line and "learning_rate" in line
        assert rows(db, "select status from phases where round = 1 and phase = 'update'")[0]["status"] == "failed"
        assert count(db, "select count(*) from train_steps") == 0
        assert not (run_dir / "adapters" / "round-1").exists()
    result = cli_inprocess("resume", str(run_dir), "--progress", "off", "--set", "updater.nan_at=-1")
    assert result.exit_code == 0, result.stderr
    assert count(db, "select count(*) from train_steps") == 3


# -- 9. damaged files: one line, the file, the recovery ---------------------------------------


def test_truncated_database_is_one_line_naming_it(tmp_path, reference):
    run_dir = copy_run(reference[0], tmp_path)
    db = run_dir / "run.db"
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    with open(db, "r+b") as fh:
        fh.truncate(os.path.getsize(db) // 2)
    for args in (("resume", str(run_dir)), ("status", str(run_dir)), ("report", str(run_dir)),
                 ("export", str(run_dir), "-o", str(tmp_path / "x.jsonl"))):
        result = cli_inprocess(*args)
        assert result.exit_code == 2, (args, result.output)
        line = one_line(result.stderr)
        assert f"{db}: the run database is damaged" in line and ".recover" in line, line
    assert not (tmp_path / "x.jsonl").exists()
    (run_dir / "run.db").write_bytes(b"this is not sqlite" * 100)
    proc = cli("resume", str(run_dir), "--progress", "off")
    assert proc.returncode == 2 and "the run database is damaged" in one_line(proc.stderr)


def test_config_json_not_json_names_the_way_out(tmp_path, stopped):
    run_dir = copy_run(stopped[0], tmp_path)
    (run_dir / "config.json").write_text('{"name": "fake", ')
    proc = cli("resume", str(run_dir), "--progress", "off")
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"{run_dir / 'config.json'}: not valid JSON" in line and "delete" in line


@pytest.mark.parametrize("damage", ["truncated-weights", "invalid-adapter-config"])
def test_damaged_adapter_files_name_the_file_and_redo(tmp_path, stopped, damage):
    run_dir = copy_run(stopped[0], tmp_path)
    folder = run_dir / "adapters" / "round-1"
    if damage == "truncated-weights":
        target = folder / "adapter_model.safetensors"
        target.write_bytes(target.read_bytes()[:2])
    else:
        target = folder / "adapter_config.json"
        target.write_text("{")
    result = cli_inprocess("resume", str(run_dir), "--progress", "off")
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert f"{target}: has changed" in line and "--redo round-1.update" in line


def test_unreadable_adapter_without_recorded_hashes_names_the_file(tmp_path, tiny_policy):
    """Adapters of runs made before hashes were recorded: the loader's own one line."""
    from loop.errors import UserError

    folder = tmp_path / "run" / "adapters" / "round-3"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2')
    (folder / "adapter_model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{}")
    with pytest.raises(UserError, match=r"adapter_config.json: cannot be read .*--redo round-3.update"):
        tiny_policy.activate(str(folder))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "task_type": "CAUSAL_LM"}))
    with pytest.raises(UserError, match=r"adapter_model.safetensors: cannot be read .*SafetensorError"):
        tiny_policy.activate(str(folder))
    assert tiny_policy.active is None
    with pytest.raises(sqlite3.DatabaseError):  # (the same bytes are no database either)
        sqlite3.connect(folder / "adapter_model.safetensors").execute("select 1 from sqlite_master").fetchall()
