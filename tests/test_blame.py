"""Plugin blame: what goes wrong is pinned on the component that ran, observers never
take a run down, and ``[runner] phase_timeout_s`` fails a phase that runs too long.

Real runs of the fake components (tests/plugins/fake.py) with one misbehaving component
(tests/plugins/faulty.py) or observer (tests/plugins/faulty_observer.py) swapped in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.core_helpers import (FAKE_PLUGIN, ROOT, cli, cli_inprocess, count, fake_config,
                                rows)

FAULTY = ROOT / "tests" / "plugins" / "faulty.py"
OBSERVER = ROOT / "tests" / "plugins" / "faulty_observer.py"
OBSERVED = ("run_start", "round_start", "phase_start", "progress", "phase_end", "round_end",
            "event", "run_end")


def _config(tmp_path: Path, swap: dict[str, str] | None = None, **kw) -> Path:
    """The fake config with sections swapped: {"updater": 'name = "faulty"\\nmode = "x"'}."""
    kw = {"rounds": 1, "per_round": 2, "n": 2, **kw}
    text = fake_config(tmp_path / "runs", **kw)
    text = text.replace(f"plugins = [\"{FAKE_PLUGIN}\"]", f"plugins = [\"{FAKE_PLUGIN}\", \"{FAULTY}\"]")
    for section, body in (swap or {}).items():
        head = f"[[{section}]]" if section in ("judges", "evaluators") else f"[{section}]"
        old = f'{head}\nname = "fake"\n'
        assert old in text, section
        text = text.replace(old, f"{head}\n{body}\n")
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


CASES = [
    # (section, mode, phase, words the message must hold)
    ("updater", "raise", "update", ["in update()", "RuntimeError: faulty component: raise"]),
    ("updater", "dict", "update", ["update() returned dict; an updater returns loop.UpdateResult"]),
    ("updater", "steps", "update", ["update() .steps is a list holding float"]),
    ("updater", "no_adapter", "update", ["installing the adapter it wrote"]),
    ("updater", "keyboard", "update", ["KeyboardInterrupt: it raised one itself"]),
    ("generator", "exit", "generate", ["SystemExit: it called sys.exit(3)"]),
    ("generator", "short", "generate", ["generate() returned 1 lists for 2 prompts"]),
    ("generator", "setup", "generate", ["in generate()", "ValueError: faulty setup"]),
    ("judges", "list", "judge", ["judge() returned list; a judge returns loop.JudgeResult"]),
    ("judges", "metrics", "judge", ["judge() .metrics is holding 'judge/x': str"]),
    ("evaluators", "text", "evaluate", ["evaluate() returned holding 'eval/x': str"]),
    ("evaluators", "exit", "evaluate", ["sys.exit(3)"]),
]


@pytest.mark.parametrize("section,mode,phase,words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_failure_names_the_component_that_ran(tmp_path, section, mode, phase, words):
    config = _config(tmp_path, {section: f'name = "faulty"\nmode = "{mode}"'})
    result = cli_inprocess("run", str(config), "--progress", "off")
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    kind = {"judges": "judge", "evaluators": "evaluator"}.get(section, section)
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith(f"Error: round 0 {phase} failed in {kind} 'faulty' (plugin file:{FAULTY})") or \
        err.startswith(f"Error: round 1 {phase} failed in {kind} 'faulty' (plugin file:{FAULTY})"), err
    for w in words:
        assert w in err, (w, err)
    db = tmp_path / "runs" / "fake" / "run.db"
    (ph,) = rows(db, "select * from phases where status != 'done'")
    assert (ph["phase"], ph["status"], ph["plugin"]) == (phase, "failed", f"file:{FAULTY}")
    assert rows(db, "select status from runs")[0]["status"] == "failed"
    (ev,) = rows(db, "select plugin from events where level = 'error'")
    assert ev["plugin"] == f"file:{FAULTY}"


def test_sys_exit_in_a_generator_is_a_failed_phase_not_a_silent_exit(tmp_path):
    """In a real process: exit 1 (not the component's 3) with one line, phase failed."""
    config = _config(tmp_path, {"generator": 'name = "faulty"\nmode = "exit"'})
    proc = cli("run", str(config), "--progress", "off")
    assert proc.returncode == 1, proc.stderr
    assert "generate failed in generator 'faulty'" in proc.stderr and "sys.exit(3)" in proc.stderr
    assert "Traceback" not in proc.stderr
    db = tmp_path / "runs" / "fake" / "run.db"
    assert rows(db, "select status, plugin from phases where phase = 'generate'") == [
        {"status": "failed", "plugin": f"file:{FAULTY}"}]


def test_observers_that_raise_never_take_a_run_down(tmp_path):
    """Half the hooks raise, the other half call sys.exit(3): the run completes."""
    config = _config(tmp_path)
    proc = cli("run", str(config), "--progress", "plain", "--plugin", str(OBSERVER),
               FAULTY_HOOKS=",".join(OBSERVED[::2]), FAULTY_EXITS=",".join(OBSERVED[1::2]))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    db = tmp_path / "runs" / "fake" / "run.db"
    assert rows(db, "select status from runs")[0]["status"] == "completed"
    assert count(db, "select count(*) from phases where status = 'done'") == 1 + 7
    warned = rows(db, "select message, plugin, data from events where message like 'observer plugin%'")
    name = f"file:{OBSERVER}"
    hooks = sorted(m["message"].split(" raised in ")[1].split(":")[0] for m in warned)
    assert hooks == sorted(OBSERVED)  # each hook's failure logged once, naming the plugin
    assert all(m["plugin"] == name and m["message"].startswith(f"observer plugin {name} raised in ")
               for m in warned)
    assert "the run goes on" in warned[0]["message"]
    by_hook = {m["message"].split(" raised in ")[1].split(":")[0]: m["message"] for m in warned}
    assert "RuntimeError: observer broke in run_start" in by_hook["run_start"]
    assert "SystemExit: it called sys.exit(3)" in by_hook["round_start"]


def test_phase_timeout_fails_a_phase_that_runs_too_long(tmp_path):
    """A generator asleep in time.sleep (no progress reports) is cut at the deadline by
    the SIGALRM timer; the phase fails naming it; resume with a larger limit completes."""
    config = _config(tmp_path, generator={"sleep": 30.0})
    text = config.read_text() + "\n[runner]\nphase_timeout_s = 0.5\n"
    config.write_text(text)
    result = cli_inprocess("run", str(config), "--progress", "off")
    assert result.exit_code == 1, result.stderr
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith(f"Error: round 1 generate failed in generator 'fake' (plugin file:{FAKE_PLUGIN}), "
                          "in generate(): it ran past [runner] phase_timeout_s = 0.5 s"), err
    run_dir = tmp_path / "runs" / "fake"
    (ph,) = rows(run_dir / "run.db", "select * from phases where phase = 'generate'")
    assert ph["status"] == "failed" and ph["plugin"] == f"file:{FAKE_PLUGIN}" and ph["seconds"] < 10
    again = cli_inprocess("resume", str(run_dir), "--set", "generator.sleep=0.0",
                          "--set", "runner.phase_timeout_s=60", "--progress", "off")
    assert again.exit_code == 0, again.stderr
    assert rows(run_dir / "run.db", "select status from runs")[0]["status"] == "completed"


def test_phase_timeout_is_checked_at_progress_reports_off_the_main_thread(tmp_path):
    """Without signals (a runner in a thread) the deadline is checked at progress reports."""
    import threading

    from loop import runner as r

    config = _config(tmp_path, generator={"sleep": 0.2}, per_round=40)
    config.write_text(config.read_text() + "\n[runner]\nphase_timeout_s = 0.5\n")
    out: dict = {}

    def go():
        try:
            r.start(str(config)).run()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            out["error"] = e

    t = threading.Thread(target=go)
    t.start()
    t.join(60)
    assert "ran past [runner] phase_timeout_s = 0.5 s" in str(out["error"])
    (ph,) = rows(tmp_path / "runs" / "fake" / "run.db", "select * from phases where phase = 'generate'")
    assert ph["status"] == "failed" and ph["done"] < 40
