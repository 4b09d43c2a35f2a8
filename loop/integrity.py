"""What a resume trusts, and how to recover when a file was changed behind the run's back.

- **The database is the authority** for a run's config (``runs.config``). ``config.json``
  is a copy for people: one that differs is refused (changes go through
  ``selfloop resume RUN --set``, which is logged), one that is missing is written again
  from the database, one that is not JSON is refused naming the way out.
- **Adapters are verified**: each file of an adapter folder is hashed (sha256) when the
  update installs it, in the same transaction that marks the update done
  (``adapter_files``), and checked whenever a phase is about to load that adapter.
- **Redo**: ``selfloop resume RUN --redo round-N.PHASE`` discards that phase of round N
  and everything after it (rows of later phases and rounds in one transaction, then the
  later adapter folders), so the resume re-runs it from there.
- **A damaged database** (truncated, not SQLite) is one line naming the file and how to
  salvage it, not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from loop.errors import UserError

CONFIG_FILE = "config.json"  # a copy of the config, for people
DB_FILE = "run.db"  # the authority


class DamagedFile(UserError):
    """A run file was changed or damaged outside selfloop; the message says how to recover."""


# ---------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------


def damaged_database(path: Path, error: Exception) -> DamagedFile:
    return DamagedFile(
        f"{path}: the run database is damaged ({error}); restore run.db from a backup, or "
        f"salvage its rows with `sqlite3 {path} .recover | sqlite3 recovered.db`"
    )


@contextmanager
def reading(run_dir: Path):
    """Around a reader's queries: a damaged run.db is one line naming it, not a traceback."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        if isinstance(e, (sqlite3.OperationalError, sqlite3.IntegrityError)):
            raise  # locked, busy, readonly: not damage
        raise damaged_database(Path(run_dir) / DB_FILE, e) from None


def check_database(path: Path) -> None:
    """``PRAGMA quick_check`` (every page read once): a truncated or foreign file fails here."""
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=60)
        try:
            result = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            conn.execute("select id from runs limit 1").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise damaged_database(path, e) from None
    if result != "ok":
        raise damaged_database(path, result)


# ---------------------------------------------------------------------------
# The config: the database's copy is the authority
# ---------------------------------------------------------------------------


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _differences(x, y, f"{prefix}{i}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def write_config_file(run_dir: Path, data: dict) -> None:
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def authoritative_config(run_dir: Path, stored: str) -> tuple[dict, bool]:
    """The run's config from the database (``runs.config``), after checking config.json.

    Returns (config, missing): ``missing`` when there is no config.json (the caller
    writes it again from the database once the resume is validated).
    """
    run_dir = Path(run_dir)
    data = json.loads(stored)
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return data, True
    try:
        on_disk = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(
            f"{path}: not valid JSON ({e}); the run's config is kept in {run_dir / DB_FILE}: "
            f"delete {path} and `selfloop resume {run_dir}` writes it again"
        ) from None
    diff = _differences(data, on_disk)
    if diff:
        shown = ", ".join(diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")
        raise UserError(
            f"{path}: differs from the config stored in {run_dir / DB_FILE} ({shown}); the "
            f"database is the authority: undo the edit (or delete {CONFIG_FILE} to have it "
            f"written again), and change options with `selfloop resume {run_dir} --set "
            "KEY=VALUE`, which is logged"
        )
    return data, False


# ---------------------------------------------------------------------------
# Adapter content hashes
# ---------------------------------------------------------------------------


# Documentation beside the weights (loop/model_card.py): it names the run's folder, so two
# runs that trained the same adapter differ there, and editing it harms nothing.
UNHASHED = {"README.md"}


def hash_folder(folder: Path) -> dict[str, tuple[str, int]]:
    """{file name: (sha256, bytes)} for every file directly in ``folder`` (the model card
    excepted: ``UNHASHED``)."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and f.name not in UNHASHED:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[f.name] = (h.hexdigest(), f.stat().st_size)
    return out


def record_adapter(db, round: int, adapter: str, files: dict[str, tuple[str, int]]) -> None:
    """Inside the update's commit: the installed adapter's files and hashes."""
    db.execute("delete from adapter_files where adapter = ?", [adapter])
    db.conn.executemany(
        "insert into adapter_files (round, adapter, file, bytes, sha256) values (?, ?, ?, ?, ?)",
        [(round, adapter, name, size, sha) for name, (sha, size) in files.items()],
    )


def redo_hint(run_dir: Path, round: int) -> str:
    return (f"`selfloop resume {run_dir} --redo round-{round}.update` trains it again "
            "(everything after that update is discarded and re-run)")


def verify_adapter(store, run_dir: Path, adapter: str) -> None:
    """Every file recorded for ``adapter`` (a folder relative to the run) still has its
    recorded hash. Adapters from before hashes were recorded are not checked."""
    recorded = store.rows("select * from adapter_files where adapter = ? order by file", [adapter])
    if not recorded:
        return
    folder = Path(run_dir) / adapter
    current = hash_folder(folder) if folder.is_dir() else {}
    for row in recorded:
        path = folder / row["file"]
        if row["file"] not in current:
            problem = "is missing"
        elif current[row["file"]] != (row["sha256"], row["bytes"]):
            size = current[row["file"]][1]
            problem = (f"has changed since round {row['round']}'s update wrote it "
                       f"({size} bytes, sha256 differs from the recorded one)")
        else:
            continue
        raise DamagedFile(f"{path}: {problem}; {redo_hint(run_dir, row['round'])}")


# ---------------------------------------------------------------------------
# Redo: discard a phase of a round and everything after it
# ---------------------------------------------------------------------------

# The rows each phase writes for its own round, as (table, extra condition). Deleting in
# this order keeps foreign keys satisfied. Tables with a `round` column that are not
# listed are discarded for later rounds, and for round N only when the whole round is.
PHASE_ROWS: dict[str, list[tuple[str, str]]] = {
    "evaluate": [],
    "update": [("train_steps", ""), ("adapter_files", "")],
    "select": [("selected", ""), ("pairs", "selected = 1")],
    "judge": [("judgments", ""), ("pairs", ""), ("candidates", "source <> 'policy'")],
    "generate": [("candidates", "")],
}
REDO_RE = re.compile(r"^round-(\d+)\.([a-z]+)$")


def parse_redo(spec: str) -> tuple[int, str]:
    from loop.runner import PHASES

    m = REDO_RE.match(spec.strip())
    if not m or m.group(2) not in PHASES:
        raise UserError(
            f"--redo {spec!r}: expected round-N.PHASE, e.g. round-1.update (phases: "
            f"{', '.join(PHASES)})"
        )
    return int(m.group(1)), m.group(2)


def _round_tables(db) -> list[str]:
    tables = []
    for (name,) in db.execute("select name from sqlite_master where type = 'table'").fetchall():
        cols = [r[1] for r in db.execute(f'pragma table_info("{name}")').fetchall()]
        if "round" in cols and name not in ("events", "rounds", "phases"):
            tables.append(name)
    return tables


def _remove_round_files(run_dir: Path, first: int) -> None:
    """Adapter folders (``adapters/round-M``, a half-written ``.round-M.tmp``) and update
    caches (``cache/ref-round-M-*``: reference log-probs keyed by pair ids, which a redone
    round reuses) of every round from ``first`` on."""
    for sub in ("adapters", "cache"):
        folder = run_dir / sub
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            m = re.search(r"(?:^|[.-])round-(\d+)(?=$|[.-])", entry.name)
            if m and int(m.group(1)) >= first:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def redo(store, run_dir: Path, spec: str) -> str:
    """Discard ``round-N.PHASE`` and everything after it; returns what was done, for the log.

    One transaction removes the rows; the adapter folders of the discarded updates are
    removed after it commits (a leftover folder is replaced when its update re-runs).
    """
    from loop.runner import PHASES

    r, phase = parse_redo(spec)
    run_dir = Path(run_dir)
    if r == 0 and phase != "evaluate":
        raise UserError(f"--redo {spec}: round 0 has only the evaluate phase (round-0.evaluate)")
    if phase == "optimise":
        raise UserError(f"--redo {spec}: optimise cannot be redone alone; redo round-{r}.propose")
    status = store.phase_status(r, phase)
    if status is None:
        raise UserError(f"--redo {spec}: round {r} {phase} has not run yet; a plain "
                        f"`selfloop resume {run_dir}` runs it")
    later = list(PHASES[PHASES.index(phase):]) if r else ["evaluate"]
    with store.transaction() as db:
        db.execute("PRAGMA defer_foreign_keys = ON")
        tables = _round_tables(db)
        removed = {}
        for t in tables:  # every later round, whole
            n = db.execute(f'delete from "{t}" where round > ?', [r]).rowcount
            removed[t] = removed.get(t, 0) + n
        if phase == "propose":
            own = [(t, "") for t in tables]
        else:
            own = [x for p in reversed(later) for x in PHASE_ROWS.get(p, [])]
        for t, cond in own:
            if t not in tables:
                continue
            where = f"round = ?{' and ' + cond if cond else ''}"
            n = db.execute(f'delete from "{t}" where {where}', [r]).rowcount
            removed[t] = removed.get(t, 0) + n
        marks = ",".join("?" * len(later))
        db.execute(f"delete from metrics where round = ? and phase in ({marks})", [r, *later])
        db.execute(f"delete from phases where round > ? or (round = ? and phase in ({marks}))",
                   [r, r, *later])
        db.execute("delete from rounds where round > ?", [r])
        db.execute("update rounds set status = 'running', ended_at = null, seconds = null "
                   "where round = ?", [r])
        if "update" in later and r > 0:
            db.execute("update rounds set policy = null, adapter = null where round = ?", [r])
    first_gone = r if ("update" in later and r > 0) else r + 1
    _remove_round_files(run_dir, first_gone)
    counts = ", ".join(f"{t} {n}" for t, n in sorted(removed.items()) if n)
    return (f"redo {spec}: discarded round {r} from {phase} on and every later round "
            f"(rows removed: {counts or 'none'}; adapters and caches from round {first_gone} on)")
