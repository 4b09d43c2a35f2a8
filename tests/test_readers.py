"""Readers while the loop writes: ``status``, ``status --json``, ``watch --once`` and the
store opened read-only never meet "database is locked"; the dashboard renders."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import time

import pytest
from rich.console import Console

from loop.monitor import PlainMonitor, RichMonitor, Snapshot, render, snapshot_from_store
from loop.runner import RunInfo, load_run_config
from loop.store import Store
from tests.core_helpers import cli, cli_popen, run_inprocess, write_config

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    return ANSI.sub("", text)


def test_readers_during_a_run(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=2, per_round=5, n=4,
                          generator={"sleep": 0.1}, judge={"sleep": 0.03}, updater={"sleep": 0.2})
    run_dir = tmp_path / "runs" / "fake"
    db = run_dir / "run.db"
    writer = cli_popen("run", str(config), "--progress", "off")
    try:
        deadline = time.monotonic() + 60
        while not db.exists():
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
            time.sleep(0.02)
        held = Store.open_readonly(db)  # a reader that stays open for the whole run
        seen_json, seen_counts, errors = [], [], []
        i = 0
        while writer.poll() is None:
            # In this process: a fresh read-only store and the long-lived one.
            fresh = Store.open_readonly(db)
            try:
                counts = fresh.rows("select (select count(*) from candidates) c, "
                                    "(select count(*) from judgments) j, "
                                    "(select count(*) from phases where status = 'done') d")[0]
                seen_counts.append((counts["c"], counts["j"], counts["d"]))
                assert held.rows("select count(*) n from phases")[0]["n"] >= 0
                assert snapshot_from_store(held).name == "fake"
                with pytest.raises(sqlite3.OperationalError, match="readonly"):
                    fresh.conn.execute("insert into events (time, level, message) values ('t', 'info', 'x')")
            finally:
                fresh.close()
            # Through the CLI, as a user in another terminal would.
            args = ["status", str(run_dir)] + (["--json"] if i % 2 == 0 else [])
            if i == 3:
                args = ["watch", "--once", str(run_dir)]
            proc = cli(*args)
            errors.append(proc.stderr)
            assert proc.returncode == 0, proc.stderr
            if args[-1] == "--json":
                seen_json.append(json.loads(proc.stdout))
            elif args[0] == "watch":
                # (the run may have ended between the loop's check and this read)
                assert "rounds" in proc.stdout
                assert re.search(r"\[(running|completed)\]", proc.stdout), proc.stdout
            else:
                assert "fake [" in proc.stdout and "round" in proc.stdout
            i += 1
        held.close()
        assert writer.wait() == 0, writer.stderr.read()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert not [e for e in errors if "locked" in e]
    assert len(seen_json) >= 2, "the run ended before the readers could look twice"
    # The output shows progress: monotone counts, a running phase while it ran.
    assert seen_counts == sorted(seen_counts)
    assert seen_counts[-1] > seen_counts[0]
    assert any(d["status"] == "running" for d in seen_json)
    assert any(ph["status"] == "running" for d in seen_json for r in d["per_round"]
               for ph in r["phases"].values())
    done_phases = [sum(ph["status"] == "done" for r in d["per_round"] for ph in r["phases"].values())
                   for d in seen_json]
    assert done_phases == sorted(done_phases)
    final = json.loads(cli("status", str(run_dir), "--json").stdout)
    assert final["status"] == "completed"
    assert [r["status"] for r in final["per_round"]] == ["done"] * 3
    assert final["per_round"][1]["metrics"]["select/pairs"] >= 1
    assert final["per_round"][2]["phases"]["generate"]["done"] == 5


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readers")
    return run_inprocess(write_config(tmp / "c.toml", tmp / "runs", rounds=2, per_round=3, n=2))


def console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100)


def test_status_and_watch_once_of_a_finished_run(finished):
    out = cli("status", str(finished))
    assert out.returncode == 0 and "fake [completed]" in out.stdout and "key metrics" in out.stdout
    out = cli("watch", "--once", str(finished))
    assert out.returncode == 0
    assert "rounds" in out.stdout and "3/3" in out.stdout and "eval/accuracy" in out.stdout
    bad = cli("status", str(finished.parent / "nope"))
    assert bad.returncode == 2 and "no run.db" in bad.stderr


def test_render_shows_rounds_phase_grouped_metrics_and_events():
    s = Snapshot(name="demo", rounds=3, status="running", round=2, phase="judge", done=10,
                 total=40, phase_started=1000.0, rounds_done=2,
                 phase_metrics={"judge/parse_failures": 1.0},
                 metrics={0: {"eval/accuracy": 0.25},
                          1: {"eval/accuracy": 0.5, "zeta/custom": 3.0, "alpha/thing": 0.125,
                              "judge/mean_score": 4.5, "generate/mean_tokens": 12.0}})
    s.events.append(("warning", "judge output did not parse [twice]"))
    s.events.append(("info", "resumed"))
    c = console()
    c.print(render(s, now=1005.0))
    raw = c.file.getvalue()
    assert "\x1b[" in raw  # colours: a terminal was forced
    text = plain(raw)
    assert "2/4 (round 0 = start)  demo  [running]" in text
    assert "judge" in text and "round 2  10/40  2.0/s  elapsed 0:05  eta 0:15" in text
    assert "judge/parse_failures=1" in text
    # metrics grouped by prefix: known groups in GROUP_ORDER first, then the others A-Z
    order = [text.index(k) for k in ("eval/accuracy", "judge/mean_score", "generate/mean_tokens",
                                     "alpha/thing", "zeta/custom")]
    assert order == sorted(order)
    assert "r0" in text and "r1" in text and "0.250" in text and "0.125" in text
    assert "judge output did not parse [twice]" in text and "resumed" in text
    assert "metrics by round" in text and "events" in text


def test_rich_monitor_follows_the_hooks(finished):
    store = Store.open_readonly(finished / "run.db")
    try:
        run = RunInfo("fake", finished, load_run_config(finished), 2, False, store)
        c = console()
        mon = RichMonitor(console=c, refresh_per_second=20)
        with mon:
            mon.run_start(run=run)
            mon.round_start(run=run, round=2)
            mon.phase_start(run=run, round=2, phase="update")
            mon.progress(run=run, round=2, phase="update", done=2, total=3, metrics={"loss": 0.5})
            mon.event(run=run, round=2, phase="update", level="warning", message="slow step",
                      data={})
            mid = plain(_text(mon.snapshot))
            mon.phase_end(run=run, round=2, phase="update", status="done", seconds=1.0)
            mon.round_end(run=run, round=2, metrics=store.metrics(2))
            mon.run_end(run=run, status="completed")
        assert "update" in mid and "2/3" in mid and "loss=0.500" in mid and "slow step" in mid
        assert mon.snapshot.rounds_done == 4 and mon.snapshot.phase is None
        final = plain(c.file.getvalue())
        assert "[completed]" in final and "eval/accuracy" in final and "prompts/proposed" in final
    finally:
        store.close()


def _text(snapshot) -> str:
    c = console()
    c.print(render(snapshot))
    return c.file.getvalue()


def test_plain_monitor_lines(finished):
    store = Store.open_readonly(finished / "run.db")
    try:
        run = RunInfo("fake", finished, load_run_config(finished), 2, True, store)
        out = io.StringIO()
        mon = PlainMonitor(stream=out, every=0.0)
        mon.run_start(run=run)
        mon.phase_start(run=run, round=1, phase="generate")
        mon.progress(run=run, round=1, phase="generate", done=3, total=5, metrics={"x/y": 0.5})
        mon.phase_end(run=run, round=1, phase="generate", status="done", seconds=1.25)
        mon.event(run=run, round=1, phase="generate", level="info", message="quiet", data={})
        mon.event(run=run, round=1, phase="generate", level="warning", message="loud", data={})
        mon.round_end(run=run, round=1, metrics={"eval/accuracy": 0.5, "select/pairs": 3.0})
        mon.run_end(run=run, status="completed")
    finally:
        store.close()
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in out.getvalue().splitlines())
    assert lines == [
        f"resuming run fake (2 rounds) in {finished}",
        "round 1 generate ...",
        "round 1 generate 3/5 x/y=0.500",
        "round 1 generate done in 1.2s",
        "warning: loud",
        "round 1 done: eval/accuracy=0.500 select/pairs=3",
        "run fake completed",
    ]
