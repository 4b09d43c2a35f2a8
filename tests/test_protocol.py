"""The round protocol end to end, with the fake components registered as real plugins.

Real SQLite files, real subprocesses for the failure / lock cases; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import loop
from loop import plugins
from loop.runner import PHASES
from tests.core_helpers import (
    FAKE_PLUGIN,
    cli,
    cli_inprocess,
    cli_popen,
    count,
    rows,
    run_inprocess,
    sigkill,
    wait_for_phase,
    write_config,
)

ROUNDS, PER_ROUND, N, SAMPLES, STEPS = 3, 5, 4, 2, 3


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """One uninterrupted 3-round fake run (in-process); returns its run folder."""
    tmp = tmp_path_factory.mktemp("protocol")
    config = write_config(tmp / "fake.toml", tmp / "runs", rounds=ROUNDS, per_round=PER_ROUND, n=N)
    return run_inprocess(config)


def test_three_rounds_complete(fake_run):
    db = fake_run / "run.db"
    (run,) = rows(db, "select * from runs")
    assert run["status"] == "completed" and run["rounds"] == ROUNDS and run["seed"] == 7
    rounds = rows(db, "select * from rounds order by round")
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["status"] == "done" for r in rounds)
    assert [r["policy"] for r in rounds] == ["base", "round-1", "round-2", "round-3"]
    assert [r["adapter"] for r in rounds] == [None, "adapters/round-1", "adapters/round-2",
                                              "adapters/round-3"]
    phases = rows(db, "select round, phase, status, attempt from phases")
    expected = {(0, "evaluate")} | {(r, p) for r in range(1, ROUNDS + 1) for p in PHASES}
    assert {(p["round"], p["phase"]) for p in phases} == expected
    assert all(p["status"] == "done" and p["attempt"] == 1 for p in phases)
    for r in range(1, ROUNDS + 1):
        assert (fake_run / "adapters" / f"round-{r}" / "adapter_config.json").is_file()
        assert (fake_run / "adapters" / f"round-{r}" / "adapter_model.safetensors").is_file()
    assert not [p for p in (fake_run / "adapters").iterdir() if p.name.startswith(".")]


def test_every_table_has_the_expected_rows(fake_run):
    db = fake_run / "run.db"
    for r in range(1, ROUNDS + 1):
        assert count(db, "select count(*) from prompts where round = ?", [r]) == PER_ROUND
        assert count(db, "select count(*) from round_prompts where round = ?", [r]) == PER_ROUND
        assert count(db, "select count(*) from candidates where round = ?", [r]) == PER_ROUND * N
        # n candidates per prompt, sample_index 0..n-1
        per_prompt = rows(db, "select prompt_id, count(*) n, group_concat(sample_index) s "
                              "from candidates where round = ? group by prompt_id", [r])
        assert len(per_prompt) == PER_ROUND
        assert all(p["n"] == N and sorted(map(int, p["s"].split(","))) == list(range(N))
                   for p in per_prompt)
        assert count(db, "select count(*) from judgments where round = ?", [r]) == PER_ROUND * N * SAMPLES
        assert count(db, "select count(*) from train_steps where round = ?", [r]) == STEPS
        npairs = count(db, "select count(*) from pairs where round = ? and selected = 1", [r])
        assert 1 <= npairs <= PER_ROUND
        metrics = {m["name"]: m["value"] for m in rows(db, "select * from metrics where round = ?", [r])}
        assert metrics["prompts/proposed"] == PER_ROUND
        assert metrics["generate/candidates"] == PER_ROUND * N
        assert metrics["judge/judgments"] == PER_ROUND * N * SAMPLES
        assert metrics["select/pairs"] == npairs
        assert metrics["train/steps"] == STEPS
        failures = count(db, "select count(*) from judgments where round = ? and score is null", [r])
        assert metrics["judge/parse_failures"] == failures
    # Unparseable judge output is a recorded failure with its raw text, never a score.
    assert count(db, "select count(*) from judgments where score is null and (error is null or raw = '')") == 0
    assert count(db, "select count(*) from judgments where score is null") > 0
    assert [m["round"] for m in rows(db, "select distinct round from metrics where name = "
                                         "'eval/accuracy' order by round")] == [0, 1, 2, 3]
    assert count(db, "select count(*) from prompts where round = 0") == 0
    assert count(db, "select count(*) from selected") == 0  # the fake selector makes pairs only


def test_rows_link_to_what_they_came_from(fake_run):
    db = fake_run / "run.db"
    # every candidate -> its prompt, of its round
    assert count(db, "select count(*) from candidates c left join prompts p on p.id = c.prompt_id "
                     "where p.id is null or p.round != c.round") == 0
    # every judgment -> its candidate, of its round
    assert count(db, "select count(*) from judgments j left join candidates c on c.id = j.candidate_id "
                     "where c.id is null or c.round != j.round") == 0
    # every pair -> two distinct candidates of the pair's prompt and round, best one chosen
    assert count(db, """
        select count(*) from pairs p
        left join candidates ch on ch.id = p.chosen_id
        left join candidates rj on rj.id = p.rejected_id
        where ch.id is null or rj.id is null or ch.id = rj.id
           or ch.prompt_id != p.prompt_id or rj.prompt_id != p.prompt_id
           or ch.round != p.round or rj.round != p.round
           or not (p.chosen_score > p.rejected_score)
           or abs(p.margin - (p.chosen_score - p.rejected_score)) > 1e-9""") == 0
    assert count(db, "select count(*) from pairs") > 0
    # round_prompts -> prompts of the same round
    assert count(db, "select count(*) from round_prompts rp left join prompts p on p.id = rp.prompt_id "
                     "where p.id is null or p.round != rp.round") == 0
    # candidates were written by the policy of the previous round
    for r in range(1, ROUNDS + 1):
        policies = {x["policy"] for x in rows(db, "select policy from candidates where round = ?", [r])}
        assert policies == {"base" if r == 1 else f"round-{r - 1}"}
    # the scores a pair carries are the judges' mean valid scores of its candidates
    pair = rows(db, "select * from pairs order by id limit 1")[0]
    mean = rows(db, "select avg(score) s from judgments where candidate_id = ? and score is not null",
                [pair["chosen_id"]])[0]["s"]
    assert pair["chosen_score"] == pytest.approx(mean)
    conn_fk = rows(db, "pragma foreign_key_check")
    assert conn_fk == []


def test_config_is_saved_resolved(fake_run):
    saved = json.loads((fake_run / "config.json").read_text())
    (run,) = rows(fake_run / "run.db", "select config from runs")
    assert json.loads(run["config"]) == saved
    assert saved["judges"][0] == {"name": "fake", "weight": 1.0, "label": None, "samples": 2,
                                  "sleep": 0.0, "fail_every": 7}
    assert saved["updater"] == {"name": "fake", "steps": 3, "sleep": 0.0, "nan_at": -1}
    assert saved["plugins"] == [str(FAKE_PLUGIN)]


# -- a plugin object registered with loop.plugins.register -----------------------------


class Recorder:
    """Records every lifecycle hook call, and registers two components of its own."""

    def __init__(self):
        self.calls: list[tuple] = []

    class Shouter(loop.Judge):
        name = "recorder_shouter"

        def judge(self, ctx, candidates):
            return loop.JudgeResult(judgments=[
                loop.Judgment(candidate=c, score=float(len(c.text)), raw=str(len(c.text)))
                for c in candidates
            ], metrics={"shouter/seen": len(candidates)})

    @loop.hookimpl
    def register_judges(self, register):
        register(self.Shouter)

    @loop.hookimpl
    def run_start(self, run):
        self.calls.append(("run_start", run.name, run.rounds, run.resumed))

    @loop.hookimpl
    def round_start(self, run, round):
        self.calls.append(("round_start", round))

    @loop.hookimpl
    def phase_start(self, run, round, phase):
        self.calls.append(("phase_start", round, phase))

    @loop.hookimpl
    def progress(self, run, round, phase, done, total, metrics):
        self.calls.append(("progress", round, phase, done, total, dict(metrics)))

    @loop.hookimpl
    def phase_end(self, run, round, phase, status, seconds):
        assert isinstance(seconds, float) and seconds >= 0
        self.calls.append(("phase_end", round, phase, status))

    @loop.hookimpl
    def round_end(self, run, round, metrics):
        assert metrics == run.store.metrics(round)
        self.calls.append(("round_end", round, dict(metrics)))

    @loop.hookimpl
    def event(self, run, round, phase, level, message, data):
        self.calls.append(("event", round, phase, level, message))

    @loop.hookimpl
    def run_end(self, run, status):
        self.calls.append(("run_end", status))


@pytest.fixture
def recorder():
    rec = Recorder()
    name = plugins.register(rec, name="test-recorder")
    try:
        yield rec
    finally:
        plugins.unregister(name=name)
    assert "recorder_shouter" not in plugins.registry().components["judge"]


def test_registered_plugin_object_and_hook_order(tmp_path, recorder):
    assert plugins.registry().components["judge"]["recorder_shouter"].plugin == "test-recorder"
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=2, per_round=3, n=2,
                          extra='[[judges]]\nname = "recorder_shouter"\nweight = 0.5\n')
    run_dir = run_inprocess(config)
    db = run_dir / "run.db"
    # The object's judge took part: its judgments are stored under its label.
    assert count(db, "select count(*) from judgments where judge = 'recorder_shouter'") == 2 * 3 * 2
    assert count(db, "select count(*) from metrics where name = 'shouter/seen'") == 2

    calls = recorder.calls
    skeleton = [c for c in calls if c[0] not in ("progress", "event")]
    expected = [("run_start", "fake", 2, False), ("round_start", 0), ("phase_start", 0, "evaluate"),
                ("phase_end", 0, "evaluate", "done")]
    expected.append(("round_end", 0))
    for r in (1, 2):
        expected.append(("round_start", r))
        for p in PHASES:
            expected += [("phase_start", r, p), ("phase_end", r, p, "done")]
        expected.append(("round_end", r))
    expected.append(("run_end", "completed"))
    assert [c[:2] if c[0] == "round_end" else c for c in skeleton] == expected
    # round_end carries the round's metrics
    ends = {c[1]: c[2] for c in calls if c[0] == "round_end"}
    assert ends[2]["prompts/proposed"] == 3 and "eval/accuracy" in ends[0]
    # progress only inside its phase: after phase_start and before phase_end of that phase
    current = None
    seen = set()
    for c in calls:
        if c[0] == "phase_start":
            current = c[1:3]
        elif c[0] == "phase_end":
            current = None
        elif c[0] == "progress":
            assert current == c[1:3], c
            done, total = c[3], c[4]
            assert total is None or 0 < done <= total
            seen.add(c[2])
    assert {"generate", "judge", "update"} <= seen
    assert any(c[0] == "progress" and c[2] == "update" and "loss" in c[5] for c in calls)


# -- failures ----------------------------------------------------------------------------


def test_failing_component_marks_phase_failed_then_resume_retries(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=1, per_round=2, n=2,
                          generator={"fail": True})
    proc = cli("run", str(config), "--progress", "plain")
    assert proc.returncode == 1, proc.stderr
    err_line = proc.stderr.strip().splitlines()[-1]
    plugin_name = f"file:{FAKE_PLUGIN}"
    assert err_line.startswith("Error: round 1 generate failed in generator 'fake'")
    assert plugin_name in err_line and "RuntimeError: the fake generator was told to fail" in err_line
    run_dir = tmp_path / "runs" / "fake"
    db = run_dir / "run.db"
    (ph,) = rows(db, "select * from phases where round = 1 and phase = 'generate'")
    assert ph["status"] == "failed" and ph["plugin"] == plugin_name and "told to fail" in ph["error"]
    assert rows(db, "select status from runs")[0]["status"] == "failed"
    (ev,) = rows(db, "select * from events where level = 'error'")
    assert ev["plugin"] == plugin_name and ev["round"] == 1 and ev["phase"] == "generate"
    tb = json.loads(ev["data"])["traceback"]
    assert tb.startswith("Traceback") and "RuntimeError: the fake generator was told to fail" in tb
    assert "fake.py" in tb
    # Nothing already stored is lost: propose and optimise stay done, no candidates.
    assert count(db, "select count(*) from phases where status = 'done' and round = 1") == 2
    assert count(db, "select count(*) from candidates") == 0

    # `status` shows the failure (a reader, while nothing runs).
    shown = cli_inprocess("status", str(run_dir))
    assert shown.exit_code == 0 and "fake [failed]" in shown.stdout
    assert "round 1 generate failed: generate failed in generator 'fake'" in " ".join(shown.stdout.split())

    # Resuming without a fix fails the same way, attempt 2.
    again = cli_inprocess("resume", str(run_dir), "--progress", "off")
    assert again.exit_code == 1 and "told to fail" in again.stderr
    assert rows(db, "select attempt from phases where round = 1 and phase = 'generate'")[0]["attempt"] == 2

    # Fields that define the run cannot change on resume: exit 2, one line, nothing changed.
    refused = cli("resume", str(run_dir), "--set", "seed=8")
    assert refused.returncode == 2 and "seed cannot change on resume" in refused.stderr
    assert json.loads((run_dir / "config.json").read_text())["generator"]["fail"] is True
    # An option can: `resume --set` validates it, saves it and logs the change.
    fixed = cli_inprocess("resume", str(run_dir), "--set", "generator.fail=false", "--progress", "plain")
    assert json.loads((run_dir / "config.json").read_text())["generator"]["fail"] is False
    assert json.loads(rows(db, "select config from runs")[0]["config"])["generator"]["fail"] is False
    assert count(db, "select count(*) from events where message like 'config changed on resume%'") == 1
    assert fixed.exit_code == 0, fixed.stderr
    assert "resuming run fake" in fixed.stderr and "round 1 generate done" in fixed.stderr
    (ph,) = rows(db, "select * from phases where round = 1 and phase = 'generate'")
    assert ph["status"] == "done" and ph["attempt"] == 3 and ph["error"] is None
    assert count(db, "select count(*) from candidates") == 2 * 2
    assert rows(db, "select status from runs")[0]["status"] == "completed"
    assert count(db, "select count(*) from events where message like 're-running generate%attempt 3%'") == 1


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    # The holder's generate phase lasts ~60 s (it is killed at the end), so it is surely
    # still running however slowly the refused process starts on a loaded machine.
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=1, per_round=10, n=2,
                          generator={"sleep": 6.0})
    holder = cli_popen("run", str(config), "--progress", "off")
    run_dir = tmp_path / "runs" / "fake"
    try:
        wait_for_phase(holder, run_dir / "run.db", 1, "generate")
        second = cli("resume", str(run_dir), "--progress", "off")
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1
        assert f"pid {holder.pid}" in lines[0] and "another selfloop process" in lines[0]
        assert str(run_dir) in lines[0]
        # The refused process wrote nothing: the holder's phase is still running, attempt 1.
        (ph,) = rows(run_dir / "run.db", "select * from phases where round = 1 and phase = 'generate'")
        assert ph["status"] == "running" and ph["attempt"] == 1
        # `run` of the same config is refused too (the folder exists), exit 2.
        assert cli("run", str(config)).returncode == 2
    finally:
        if holder.poll() is None:
            sigkill(holder)


def test_stale_lock_of_a_killed_process_does_not_block_resume(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=1, per_round=6, n=2,
                          generator={"sleep": 0.3})
    proc = cli_popen("run", str(config), "--progress", "off")
    run_dir = tmp_path / "runs" / "fake"
    wait_for_phase(proc, run_dir / "run.db", 1, "generate")
    sigkill(proc)
    lock = json.loads((run_dir / "lock").read_text())
    assert lock["pid"] == proc.pid  # the dead holder's pid is still in the file
    # Resume in this process: the kernel dropped the dead process's flock.
    result = cli_inprocess("resume", str(run_dir), "--progress", "off")
    assert result.exit_code == 0, result.stderr
    db = run_dir / "run.db"
    assert rows(db, "select status from runs")[0]["status"] == "completed"
    assert json.loads((run_dir / "lock").read_text())["pid"] == os.getpid()
    (ph,) = rows(db, "select * from phases where round = 1 and phase = 'generate'")
    assert ph["status"] == "done" and ph["attempt"] == 2
    assert count(db, "select count(*) from candidates") == 6 * 2


def test_resume_from_another_folder_finds_the_model_and_cache(tmp_path, monkeypatch):
    """A run started with a relative runs_dir stores an absolute model path, and a resume
    from another working folder uses the run's own runs_dir (for the model cache too)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    text = write_config(tmp_path / "c.toml", Path("runs"), rounds=1, per_round=2, n=2,
                        generator={"fail": True}).read_text()
    config = tmp_path / "c.toml"
    assert cli("run", str(config), "--progress", "off", cwd=a).returncode == 1
    run_dir = a / "runs" / "fake"
    db = run_dir / "run.db"
    model_path = rows(db, "select model_path from runs")[0]["model_path"]
    assert model_path == str(a / "runs" / ".cache" / "fake-model")
    assert json.loads((run_dir / "config.json").read_text())["runs_dir"] == "runs"
    assert 'runs_dir = "runs"' in text
    # The cached model is gone (cleaned up), the run is resumed from folder b.
    shutil.rmtree(a / "runs" / ".cache")
    monkeypatch.chdir(b)  # (the database is the authority: the fix goes through --set)
    result = cli_inprocess("resume", str(run_dir), "--progress", "off", "--set", "generator.fail=false")
    assert result.exit_code == 0, result.stderr
    assert list(b.iterdir()) == []  # nothing written in the current folder
    assert (a / "runs" / ".cache" / "fake-model" / "config.json").is_file()
    assert rows(db, "select status from runs")[0]["status"] == "completed"
