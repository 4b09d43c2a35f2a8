"""Shared helpers for the core tests: fake configs, the CLI in a subprocess or in-process,
polling a run database read-only, and a comparable snapshot of a run.

Everything here uses the real store (SQLite files) and real processes; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_PLUGIN = ROOT / "tests" / "plugins" / "fake.py"
PYTHON = sys.executable


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + extra.pop("PYTHONPATH") if "PYTHONPATH" in extra else "")
    e.pop("FAKE_KILL_ON_SQL", None)
    e.pop("SELFLOOP_TRACE_PLUGINS", None)
    e.update(extra)
    return e


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def fake_config(
    runs_dir: Path,
    *,
    name: str = "fake",
    rounds: int = 3,
    n: int = 4,
    per_round: int = 5,
    generator: dict | None = None,
    judge: dict | None = None,
    updater: dict | None = None,
    top: dict | None = None,
    extra: str = "",
) -> str:
    """The text of a fake-components config (like tests/fake.toml, with absolute paths)."""
    lines = [
        f"name = {toml_value(name)}",
        f"rounds = {rounds}",
        "seed = 7",
        f"runs_dir = {toml_value(str(runs_dir))}",
        f"plugins = [{toml_value(str(FAKE_PLUGIN))}]",
    ]
    for k, v in (top or {}).items():
        lines.append(f"{k} = {toml_value(v)}")
    lines += [
        "",
        "[model]",
        'build = { name = "fake" }',
        "",
        "[generator]",
        'name = "fake"',
        *(f"{k} = {toml_value(v)}" for k, v in (generator or {}).items()),
        "",
        "[generate]",
        f"n = {n}",
        "",
        "[[prompts]]",
        'name = "fake"',
        f"per_round = {per_round}",
        "",
        "[[judges]]",
        'name = "fake"',
        *(f"{k} = {toml_value(v)}" for k, v in (judge or {}).items()),
        "",
        "[selector]",
        'name = "fake_pairs"',
        "",
        "[updater]",
        'name = "fake"',
        *(f"{k} = {toml_value(v)}" for k, v in (updater or {}).items()),
        "",
        "[[evaluators]]",
        'name = "fake"',
        "",
        extra,
    ]
    return "\n".join(lines) + "\n"


def write_config(path: Path, runs_dir: Path, **kw) -> Path:
    path.write_text(fake_config(runs_dir, **kw), encoding="utf-8")
    return path


# -- the CLI -------------------------------------------------------------------------


def cli(*args: str, timeout: float = 120, check_rc: int | None = None, cwd: Path = ROOT,
        **env_extra) -> subprocess.CompletedProcess:
    """``python -m loop ARGS`` in a subprocess."""
    proc = subprocess.run(
        [PYTHON, "-m", "loop", *args], capture_output=True, text=True, timeout=timeout,
        env=env(**env_extra), cwd=str(cwd),
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def cli_popen(*args: str, **env_extra) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "loop", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env(**env_extra), cwd=str(ROOT),
    )


def cli_inprocess(*args: str):
    """The same command through click's CliRunner, in this process (fast)."""
    from click.testing import CliRunner

    from loop.cli import cli as group

    return CliRunner().invoke(group, list(args), catch_exceptions=False)


def run_inprocess(config: Path, *extra: str) -> Path:
    """``selfloop run CONFIG`` in this process; returns the run folder."""
    result = cli_inprocess("run", str(config), "--progress", "off", *extra)
    assert result.exit_code == 0, (result.exit_code, result.output, result.stderr)
    line = [x for x in result.stderr.splitlines() if x.startswith("run folder: ")][-1]
    return Path(line.removeprefix("run folder: "))


# -- reading a run ---------------------------------------------------------------------


def ro_connect(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def phase_status(db_path: Path, round: int, phase: str) -> str | None:
    if not Path(db_path).exists():
        return None
    try:
        conn = ro_connect(db_path)
        try:
            row = conn.execute(
                "select status from phases where round = ? and phase = ?", [round, phase]
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the file exists but the schema is not there yet
        return None
    return row[0] if row else None


def wait_for_phase(proc: subprocess.Popen, db_path: Path, round: int, phase: str,
                   status: str = "running", timeout: float = 60) -> None:
    """Poll the run database read-only until (round, phase) has ``status``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if phase_status(db_path, round, phase) == status:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended ({proc.returncode}) before round {round} "
                                 f"{phase} was {status}: {err[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for round {round} {phase} {status}")


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def count(db_path: Path, sql: str, params=()) -> int:
    conn = ro_connect(db_path)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()


def rows(db_path: Path, sql: str, params=()) -> list[dict]:
    conn = ro_connect(db_path)
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


# Columns that record when or how often, not what: left out when two runs are compared.
VOLATILE = {
    "runs": {"created_at"},
    "rounds": {"started_at", "ended_at", "seconds"},
    "phases": {"attempt", "started_at", "ended_at", "seconds"},
}
SKIP_TABLES = {"events", "_sqlite_migrations"}


def db_snapshot(db_path: Path, replace: dict[str, str] | None = None) -> dict:
    """Per table: row count, the rows (ids included) and a content hash.

    Text values have ``replace``'s keys swapped for its values (a run folder's path).
    """
    conn = ro_connect(db_path)
    out = {}
    try:
        tables = [r[0] for r in conn.execute(
            "select name from sqlite_master where type = 'table' and name not like 'sqlite_%' order by name")]
        for t in tables:
            if t in SKIP_TABLES:
                continue
            cols = [r[1] for r in conn.execute(f'pragma table_info("{t}")')]
            keep = [c for c in cols if c not in VOLATILE.get(t, set())]
            body = []
            for r in conn.execute(f'select {", ".join(keep)} from "{t}" order by {", ".join(keep)}'):
                row = []
                for v in r:
                    if isinstance(v, str):
                        for a, b in (replace or {}).items():
                            v = v.replace(a, b)
                    row.append(v)
                body.append(tuple(row))
            digest = hashlib.sha256(json.dumps(body, default=str).encode()).hexdigest()
            out[t] = {"count": len(body), "sha256": digest, "rows": body, "columns": keep}
    finally:
        conn.close()
    return out


def tree_snapshot(folder: Path, replace: dict[str, str] | None = None) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) -> sha256 of its bytes; in model
    cards (README.md) each ``replace`` key is replaced first (a run folder's own path)."""
    folder = Path(folder)

    def content(p: Path) -> bytes:
        data = p.read_bytes()
        if p.name == "README.md":
            for old, new in (replace or {}).items():
                data = data.replace(old.encode(), new.encode())
        return data

    return {
        str(p.relative_to(folder)): hashlib.sha256(content(p)).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(folder)) + "/": "dir" for p in sorted(folder.rglob("*")) if p.is_dir()}
