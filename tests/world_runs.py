"""Two-round runs of the tiny world through the real CLI, with any selector and updater,
and the learning each one must show.

The demo config is shortened (a 250-step seed recipe, 16 prompts x 3 answers, one judge
sample, 6 optimizer steps, held-out accuracy on 60 prompts) so one run takes seconds; every
run of a test session shares one runs folder, so the tiny model is built once
(``world_runs_dir`` fixture in conftest.py). Seeds are fixed (the config's seed 0), so a
run's accuracies are the same on every machine with the same torch; ``check_gain`` fails
when an updater stops learning.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHORT = [
    "--set", "rounds=2",
    "--set", "model.build.steps=250",
    "--set", "prompts.0.per_round=16",
    "--set", "evaluators.0.heldout=60",
    "--set", "judges.0.samples=1",
    "--set", "generate.n=3",
]

LORA = ("learning_rate=1e-3, batch_size=8, lora_r=8, lora_alpha=16, lora_dropout=0.0, "
        "warmup_ratio=0.0, scheduler=\"constant\"")

STEPS = 6  # optimizer steps per round


ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}


def world_command(runs_dir: Path, name: str, selector: str, updater: str, *extra: str,
                  max_steps: int = STEPS):
    return [sys.executable, "-m", "loop", "run", "configs/demo.toml", "--progress", "plain",
            "--set", f"runs_dir={runs_dir}", "--set", f"name={name}", *SHORT,
            "--set", f"selector={{{selector}}}",
            "--set", f"updater={{{updater}, {LORA}, max_steps={max_steps}}}", *extra]


def run_world(runs_dir: Path, name: str, selector: str, updater: str, *extra: str,
              max_steps: int = STEPS):
    """The run of ``world_command`` through the real CLI in this process (click's runner:
    no second import of torch and transformers, several seconds of CPU a run)."""
    from tests.core_helpers import cli_inprocess

    cmd = world_command(runs_dir, name, selector, updater, *extra, max_steps=max_steps)
    args = cmd[cmd.index("loop") + 1:]
    args[1] = str(ROOT / args[1])  # configs/demo.toml, whatever the working folder
    result = cli_inprocess(*args)
    assert result.exit_code == 0, (result.exit_code, result.output[-2000:], result.stderr[-3000:])
    return runs_dir / name


def run_world_subprocess(runs_dir: Path, name: str, selector: str, updater: str, *extra: str,
                         max_steps: int = STEPS):
    """``run_world`` in a ``python -m loop`` subprocess: the peer of a killed-and-resumed
    subprocess run whose adapter must match it byte for byte."""
    import subprocess

    cmd = world_command(runs_dir, name, selector, updater, *extra, max_steps=max_steps)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return runs_dir / name


def q(db: Path, sql: str, params=()):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def check_two_rounds(run_dir: Path, metric: str, steps: int = STEPS):
    """Both rounds done, each trained (``steps`` steps) into its own adapter, ``metric`` logged."""
    db = run_dir / "run.db"
    assert q(db, "select status from runs")[0]["status"] == "completed"
    rounds = q(db, "select round, policy from rounds where status = 'done' order by round")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in (1, 2):
        rows = q(db, "select loss, metrics from train_steps where round = ? order by step", [r])
        assert len(rows) == steps and all(s["loss"] == s["loss"] for s in rows)
        assert metric in json.loads(rows[0]["metrics"])
        assert (run_dir / "adapters" / f"round-{r}" / "adapter_model.safetensors").is_file()
    return db


def accuracy(db: Path) -> list[float]:
    """Held-out accuracy (tinyworld evaluator) of rounds 0, 1, 2, ... in points."""
    rows = q(db, "select round, value from metrics where name = 'eval/accuracy' order by round")
    return [100 * r["value"] for r in rows]


def check_gain(db: Path, points: float, by_round: int = 2):
    """The held-out accuracy of round ``by_round`` is at least ``points`` above round 0's.
    The message shows every round's accuracy, so a failure says how learning broke."""
    acc = accuracy(db)
    assert len(acc) > by_round, f"no accuracy for round {by_round}: {acc}"
    gain = acc[by_round] - acc[0]
    assert gain >= points, (
        f"{db.parent.name}: held-out accuracy by round {acc}, a gain of {gain:+.1f} points by "
        f"round {by_round}; expected at least +{points}")
    return acc
