"""The terminal stays readable: the dashboard fits 100x30 and uses 160x50, a real
pseudo-terminal run keeps every third-party message off the screen and in run.log, a seed
model's build shows its progress, a closed pipe never fails a phase, and run/resume end
with a summary. Model-free (tests/plugins/fake.py and noisy.py): a few seconds."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from rich.console import Console

from loop.monitor import Snapshot, render
from tests.core_helpers import FAKE_PLUGIN, PYTHON, ROOT, cli, env, fake_config, ro_connect

NOISY_PLUGIN = ROOT / "tests" / "plugins" / "noisy.py"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]")

# The metric names of a demo round (one self_reward judge, DPO, the tinyworld evaluator).
ROUND_METRICS = [
    "eval/accuracy", "eval/mean_length", "eval/habit_rate",
    "judge/judgments", "judge/mean_score", "judge/parse_failure_rate", "judge/parse_failures",
    "judge/self_reward/judgments", "judge/self_reward/mean_score",
    "judge/self_reward/parse_failure_rate", "judge/self_reward/parse_failures",
    "judge/self_reward/samples", "judge/self_reward/length_corr",
    "judge/self_reward/score_spread", "judge/self_reward/verifier_auc",
    "judge/verifier_agreement", "judge/verified_judgments",
    "select/pairs", "select/selected", "select/chosen_tokens", "select/rejected_tokens",
    "select/length_ratio", "select/length_corr",
    "rewards/margin", "rewards/accuracy", "rewards/chosen", "rewards/rejected",
    "train/loss", "train/final_loss", "train/steps", "train/pairs", "train/ref_cache_hit",
    "generate/candidates", "generate/mean_tokens", "generate/truncated_rate",
    "prompts/proposed",
]


def demo_snapshot(rounds: int = 6) -> Snapshot:
    metrics = {0: {"eval/accuracy": 0.435, "eval/mean_length": 6.76, "eval/habit_rate": 0.5}}
    for r in range(1, rounds):
        metrics[r] = {name: 0.5 + 0.01 * i + r for i, name in enumerate(ROUND_METRICS)}
        metrics[r].update({k: 0.1 for k in metrics[r] if "length_" in k})  # no bias warning
    s = Snapshot(name="demo", rounds=8, status="running", round=rounds, phase="judge",
                 done=57, total=384, phase_started=1000.0, rounds_done=rounds,
                 phase_metrics={}, metrics=metrics)
    for i in range(8):
        s.events.append(("info", f"event {i}: " + "a long message " * 12))
    return s


def draw(snapshot: Snapshot, width: int, height: int) -> list[str]:
    console = Console(file=io.StringIO(), force_terminal=True, width=width, height=height)
    console.print(render(snapshot, now=1010.0, width=width, height=height))
    return ANSI.sub("", console.file.getvalue()).splitlines()


def test_dashboard_fits_100x30():
    lines = draw(demo_snapshot(), 100, 30)
    text = "\n".join(lines)
    assert len(lines) <= 29, text  # the live display keeps the cursor's line free
    assert max(len(line) for line in lines) <= 100, text
    assert "6/9 (round 0 = start)  demo  [running]" in text
    assert "round 6  57/384  5.7/s  elapsed 0:10  eta 0:57" in text
    # the last five rounds, the key metrics first, a count of what is left out and where
    assert all(f"r{r}" in text for r in range(1, 6)) and " r0 " not in text
    for key in ("eval/accuracy", "judge/verifier_agreement", "select/pairs", "rewards/margin",
                "generate/mean_tokens", "train/loss", "prompts/proposed"):
        assert key in text, key
    assert re.search(r"metrics by round \((\d+) of 32; all: selfloop status demo --metrics\)",
                     text), text
    # one judge: its figures that the pooled judge/ rows already show are not repeated
    assert "judge/self_reward/mean_score" not in text and "judge/self_reward/judgments" not in text
    assert re.search(r"│ judge/(mean_score|judgments|parse_failure)", text), text
    # the events that fit, cut to one line each
    assert "event 7" in text and "event 0" not in text


def test_dashboard_uses_160x50():
    lines = draw(demo_snapshot(), 160, 50)
    text = "\n".join(lines)
    assert len(lines) <= 49 and max(len(line) for line in lines) <= 160, text
    assert "metrics by round" in text and "--metrics" not in text  # everything fits
    for name in set(ROUND_METRICS) - {"judge/self_reward/mean_score", "judge/self_reward/judgments",
                                      "judge/self_reward/parse_failure_rate",
                                      "judge/self_reward/parse_failures"}:
        assert name in text, name
    assert all(f"event {i}" in text for i in range(2, 8))  # the last six events


def test_two_judges_keep_their_own_rows():
    s = demo_snapshot(2)
    s.metrics[1]["judge/rm/mean_score"] = 0.25
    text = "\n".join(draw(s, 160, 50))
    assert "judge/self_reward/mean_score" in text and "judge/rm/mean_score" in text


def test_build_progress_row():
    s = Snapshot(status="building", phase="model", done=150, total=600, phase_started=1000.0,
                 phase_metrics={"loss": 2.5})
    text = "\n".join(draw(s, 100, 30))
    assert "building the seed model" in text
    assert "seed model step 150/600  15.0/s  elapsed 0:10  eta 0:30  loss=2.500" in text


# -- real processes ---------------------------------------------------------------------


def noisy_config(tmp: Path, rounds: int = 1, **kw) -> Path:
    text = fake_config(tmp / "runs", rounds=rounds, per_round=3, n=2, **kw,
                       extra='[[evaluators]]\nname = "noisy"\n')
    text = text.replace(f"plugins = [\"{FAKE_PLUGIN}\"]",
                        f"plugins = [\"{FAKE_PLUGIN}\", \"{NOISY_PLUGIN}\"]")
    text = text.replace('build = { name = "fake" }', 'build = { name = "noisy_build", steps = 8 }')
    path = tmp / "noisy.toml"
    path.write_text(text)
    return path


def run_in_pty(args: list[str], cols: int = 100, rows: int = 30, timeout: float = 120):
    """``python -m loop ARGS`` on a real pseudo-terminal of cols x rows; (rc, screen text)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    e = env(TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
    e.pop("NO_COLOR", None)
    proc = subprocess.Popen([PYTHON, "-m", "loop", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=e, cwd=str(ROOT), start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child's side is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
    return rc, out.decode("utf-8", errors="replace")


def test_pseudo_terminal_run_keeps_the_screen_clean(tmp_path):
    config = noisy_config(tmp_path, rounds=1)
    rc, screen = run_in_pty(["run", str(config), "--progress", "rich"])
    visible = ANSI.sub("", screen)
    assert rc == 0, visible[-3000:]
    run_dir = tmp_path / "runs" / "fake"
    log = (run_dir / "run.log").read_text()
    # nothing third-party on the screen; all of it in the run's log
    assert "NOISY" not in visible, visible[-3000:]
    for line in ("NOISY-BUILD-WARNING", "NOISY-WARNING round 0", "NOISY-WARNING round 1",
                 "NOISY-LOG round 1", "NOISY-ROOT-LOG", "NOISY-FD2 round 1",
                 "NOISY-STDERR round 1"):
        assert line in log, (line, log)
    assert "NOISY-BAR" not in log  # third-party progress bars are off, not moved
    # the build's progress, the dashboard, then the summary
    assert "building the seed model" in visible and "seed model step" in visible
    assert "[completed]" in visible and "metrics by round" in visible
    assert f"run folder: {run_dir}" in visible
    assert "fake completed: 1 of 1 rounds" in visible
    assert f"selfloop report {run_dir}" in visible and "run.log" in visible
    # every line of the dashboard fits its 100 columns (the summary's commands stay whole)
    dashboard = visible[:visible.index("fake completed")]
    assert max(len(line) for line in re.split(r"[\r\n]", dashboard)) <= 100


def test_closed_pipe_never_fails_a_phase(tmp_path):
    """`selfloop run ... 2>&1 | head -2`: the reader leaves after two lines."""
    config = noisy_config(tmp_path, rounds=2, generator={"sleep": 0.02})
    proc = subprocess.Popen([PYTHON, "-m", "loop", "run", str(config), "--progress", "plain"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env(),
                            cwd=str(ROOT))
    first = [proc.stdout.readline() for _ in range(2)]
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0, first
    conn = ro_connect(tmp_path / "runs" / "fake" / "run.db")
    try:
        status = conn.execute("select status from runs").fetchone()[0]
        failed = conn.execute("select count(*) from phases where status != 'done'").fetchone()[0]
    finally:
        conn.close()
    assert status == "completed" and failed == 0


def test_plain_run_and_resume_end_with_a_summary(tmp_path):
    config = noisy_config(tmp_path, rounds=1)
    proc = cli("run", str(config), "--progress", "plain", "--set", "generator.fail=true")
    run_dir = tmp_path / "runs" / "fake"
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = proc.stdout
    assert "fake failed: 0 of 1 rounds" in out, out
    assert re.search(r"round 1 generate +generate failed in generator 'fake'", out), out
    assert re.search(rf"next +selfloop resume {re.escape(str(run_dir))}\n", out), out
    assert "NOISY-WARNING round 0" in proc.stderr  # plain mode: stderr is the terminal's
    proc = cli("resume", str(run_dir), "--progress", "off", "--set", "generator.fail=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "fake completed: 1 of 1 rounds" in out and "eval/accuracy" in out
    assert f"selfloop report {run_dir}" in out and f"selfloop export {run_dir}" in out
