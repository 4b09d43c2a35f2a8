"""The run database: ``runs/<name>/run.db``, one SQLite file per run.

- WAL mode and foreign keys on. One writer (the loop process, holding the run lock);
  any number of readers (``status``, ``watch``, reports, Datasette) that open the file
  read-only and never block the writer.
- Writes go through ``Store.transaction()``: ``BEGIN IMMEDIATE`` on a connection with a
  generous busy timeout, so a read-then-write never meets "database is locked" halfway.
- A phase's results and its done-mark are committed in one transaction
  (``commit_phase``), so a phase killed half-way leaves nothing behind.
- The schema is created by numbered migrations (``loop/migrations.py``) and documented
  for users in ``docs/database.md``.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from loop import components as c
from loop.migrations import migrations

BUSY_TIMEOUT_MS = 60_000


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _json(value: Any) -> str | None:
    if value is None:
        return None
    if not value and type(value) is dict:
        return "{}"  # most records' meta: the same text json.dumps gives, without the call
    return json.dumps(value, sort_keys=True, default=str)


class Store:
    """Typed reads and writes on a run database."""

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool):
        self.conn = conn
        self.path = path
        self.readonly = readonly
        self.db = sqlite_utils.Database(conn)

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open (creating if needed) for writing; applies pending migrations."""
        path = Path(path)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        store = cls(conn, path, readonly=False)
        migrations.apply(store.db)
        return store

    @classmethod
    def open_readonly(cls, path: str | Path) -> Store:
        """Open read-only: for status, watch and reports, while the loop writes."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)
        conn = sqlite3.connect(
            f"file:{path.resolve()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None, check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return cls(conn, path, readonly=True)

    def close(self) -> None:
        self.conn.close()

    # -- transactions ------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""
        assert not self.readonly, "read-only store"
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:  # a full disk can fail the commit: leave no open transaction
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    # -- run and rounds ----------------------------------------------------------

    def run_row(self) -> dict | None:
        rows = list(self.db.query("select * from runs order by id limit 1"))
        return rows[0] if rows else None

    def init_run(self, name: str, config: dict, seed: int, rounds: int, version: str,
                 model_path: str | None = None) -> None:
        with self.transaction() as db:
            if self.run_row() is None:
                db["runs"].insert(
                    {
                        "name": name,
                        "created_at": now(),
                        "config": _json(config),
                        "seed": seed,
                        "rounds": rounds,
                        "status": "running",
                        "selfloop_version": version,
                        "model_path": model_path,
                    }
                )

    def set_run(self, **fields: Any) -> None:
        with self.transaction() as db:
            db.execute(
                "update runs set " + ", ".join(f"{k} = ?" for k in fields) + " where id = 1",
                list(fields.values()),
            )

    def phase(self, round: int, phase: str) -> dict | None:
        rows = list(
            self.db.query("select * from phases where round = ? and phase = ?", [round, phase])
        )
        return rows[0] if rows else None

    def phase_status(self, round: int, phase: str) -> str | None:
        row = self.phase(round, phase)
        return row["status"] if row else None

    def start_phase(self, round: int, phase: str) -> int:
        """Mark a phase running (attempt + 1); returns the attempt number."""
        with self.transaction():
            self.conn.execute("insert or ignore into rounds (round, status, started_at) "
                              "values (?, 'running', ?)", [round, now()])
            row = self.phase(round, phase)
            attempt = (row["attempt"] if row else 0) + 1
            # One statement, where sqlite-utils' upsert read the schema first: the same row.
            self.conn.execute(
                "insert into phases (round, phase, status, attempt, started_at, ended_at, seconds, "
                "done, total, error, plugin) values (?, ?, 'running', ?, ?, null, null, 0, null, "
                "null, null) on conflict (round, phase) do update set status = excluded.status, "
                "attempt = excluded.attempt, started_at = excluded.started_at, ended_at = null, "
                "seconds = null, done = 0, total = null, error = null, plugin = null",
                [round, phase, attempt, now()],
            )
        return attempt

    def progress(self, round: int, phase: str, done: int, total: int | None) -> None:
        with self.transaction() as db:
            db.execute(
                "update phases set done = ?, total = ? where round = ? and phase = ?",
                [done, total, round, phase],
            )

    def end_phase(self, db, round: int, phase: str, status: str, seconds: float, error=None, plugin=None):
        db.execute(
            "update phases set status = ?, ended_at = ?, seconds = ?, error = ?, plugin = ? "
            "where round = ? and phase = ?",
            [status, now(), round_seconds(seconds), error, plugin, round, phase],
        )

    def fail_phase(self, round: int, phase: str, seconds: float, error: str, plugin: str | None):
        with self.transaction() as db:
            self.end_phase(db, round, phase, "failed", seconds, error, plugin)

    def end_round(self, db, round: int, policy: str, adapter: str | None, seconds: float) -> None:
        db.execute(
            "update rounds set status = 'done', ended_at = ?, seconds = ?, policy = ?, adapter = ? "
            "where round = ?",
            [now(), round_seconds(seconds), policy, adapter, round],
        )

    def round_row(self, round: int) -> dict | None:
        rows = list(self.db.query("select * from rounds where round = ?", [round]))
        return rows[0] if rows else None

    # -- events ------------------------------------------------------------------

    def add_event(self, round, phase, level, message, plugin=None, data=None) -> None:
        with self.transaction():
            self.conn.execute(
                'insert into "events" (time, round, phase, level, message, plugin, data) '
                "values (?, ?, ?, ?, ?, ?, ?)",
                [now(), round, phase, level, message, plugin, _json(data or {})],
            )

    # -- writing a phase's results (inside commit_phase's transaction) ------------

    @contextmanager
    def batch(self, db=None) -> Iterator[Rows]:
        """A phase's rows, inside the open transaction: added one by one (ids given at
        once), written table by table with ``executemany`` when the block ends."""
        rows = Rows(self.conn)
        yield rows
        rows.flush()

    # One row at a time (kept for callers outside the phase writers; the same rows).

    def insert_prompt(self, db, p: c.Prompt, round: int) -> int:
        with self.batch() as b:
            return b.prompt(p, round)

    def insert_candidate(self, db, cand: c.Candidate, round: int) -> int:
        with self.batch() as b:
            return b.candidate(cand, round)

    def insert_judgment(self, db, j: c.Judgment, round: int) -> int:
        with self.batch() as b:
            return b.judgment(j, round)

    def insert_pair(self, db, p: c.Pair, round: int, *, selected: bool) -> int:
        with self.batch() as b:
            return b.pair(p, round, selected=selected)

    def insert_selected(self, db, s: c.Selected, round: int) -> int:
        with self.batch() as b:
            return b.selected(s, round)

    def insert_instruction(self, db, ins: c.Instruction, round: int) -> int:
        with self.batch() as b:
            return b.instruction(ins, round)

    def insert_decision(self, db, d: c.RewriteDecision, round: int) -> int:
        with self.batch() as b:
            return b.decision(d, round)

    def insert_train_step(self, db, step: c.TrainStep, round: int) -> None:
        with self.batch() as b:
            b.train_step(step, round)

    def put_metrics(self, db, round: int, metrics: dict[str, float], source: str, phase: str) -> None:
        """Upsert on (round, name): a metric written again takes the new value, source and phase."""
        self.conn.executemany(
            "insert into metrics (round, name, value, source, phase) values (?, ?, ?, ?, ?) "
            "on conflict (round, name) do update set value = excluded.value, "
            "source = excluded.source, phase = excluded.phase",
            [(round, name, None if value is None else float(value), source, phase)
             for name, value in metrics.items()],
        )

    def insert_heldout(self, db, evaluator: str, split: str, source: str,
                       prompts: list[c.Prompt]) -> None:
        with self.batch() as b:
            for i, p in enumerate(prompts):
                b.add("heldout", (b.next_id("heldout"), evaluator, i, source, split, p.text,
                                  p.system, p.answer, p.meta.get("key"), _json(p.meta)))

    # -- reads (typed rows as dicts) -----------------------------------------------

    def heldout(self, evaluator: str | None = None) -> list[dict]:
        """Held-out prompt rows (of one evaluator, or all), in order."""
        if evaluator is None:
            return self.rows("select * from heldout order by evaluator, position")
        return self.rows("select * from heldout where evaluator = ? order by position", [evaluator])

    def rows(self, sql: str, params=()) -> list[dict]:
        return list(self.db.query(sql, params))

    def prompts(self, round: int) -> list[dict]:
        return self.rows("select * from prompts where round = ? order by id", [round])

    def candidates(self, round: int) -> list[dict]:
        return self.rows("select * from candidates where round = ? order by id", [round])

    def judgments(self, round: int) -> list[dict]:
        return self.rows("select * from judgments where round = ? order by id", [round])

    def pairs(self, round: int) -> list[dict]:
        return self.rows("select * from pairs where round = ? order by id", [round])

    def selected(self, round: int) -> list[dict]:
        return self.rows("select * from selected where round = ? order by id", [round])

    def train_steps(self, round: int) -> list[dict]:
        return self.rows("select * from train_steps where round = ? order by step", [round])

    def metrics(self, round: int | None = None) -> dict:
        """``{round: {name: value}}``, or ``{name: value}`` for one round."""
        if round is not None:
            return {
                r["name"]: r["value"]
                for r in self.rows("select name, value from metrics where round = ?", [round])
            }
        out: dict[int, dict[str, float]] = {}
        for r in self.rows("select round, name, value from metrics order by round, name"):
            out.setdefault(r["round"], {})[r["name"]] = r["value"]
        return out

    def rounds(self) -> list[dict]:
        return self.rows("select * from rounds order by round")

    def phases(self) -> list[dict]:
        return self.rows("select * from phases order by round, started_at")

    def events(self, limit: int = 20) -> list[dict]:
        return list(reversed(self.rows("select * from events order by id desc limit ?", [limit])))

    # -- loading records back as objects (for the next phase) ---------------------

    def load_prompts(self, round: int, *, generate_only: bool = True) -> list[c.Prompt]:
        """This round's prompts that generation answers (rewritten-away originals excluded)."""
        rows = self.prompts(round)
        by_id: dict[int, c.Prompt] = {}
        for r in rows:
            by_id[r["id"]] = c.Prompt(
                text=r["text"],
                source=r["source"],
                system=r["system"],
                parent=by_id.get(r["parent_id"]),
                kind=r["kind"],
                meta=json.loads(r["meta"]) if r["meta"] else {},
                id=r["id"],
                round=r["round"],
                answer=r.get("answer"),
            )
        prompts = list(by_id.values())
        if generate_only:
            active = self.rows(
                "select prompt_id from round_prompts where round = ? order by position", [round]
            )
            if active:
                return [by_id[a["prompt_id"]] for a in active]
        return prompts

    def load_candidates(self, round: int, prompts: dict[int, c.Prompt]) -> list[c.Candidate]:
        out: dict[int, c.Candidate] = {}
        for r in self.candidates(round):
            out[r["id"]] = c.Candidate(
                prompt=prompts[r["prompt_id"]],
                text=r["text"],
                policy=r["policy"],
                sample_index=r["sample_index"],
                num_tokens=r["num_tokens"],
                finish_reason=r["finish_reason"],
                logprob_sum=r["logprob_sum"],
                source=r["source"],
                parent=out.get(r["parent_id"]),
                meta=json.loads(r["meta"]) if r["meta"] else {},
                id=r["id"],
                round=r["round"],
            )
        return list(out.values())


def round_seconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


# Columns each batched table is written with, in the tuple order ``Rows.add`` takes; the
# dict's order is the flush order, parents before the rows that point at them.
COLUMNS: dict[str, tuple[str, ...]] = {
    "prompts": ("id", "round", "text", "system", "source", "kind", "parent_id", "meta", "answer"),
    "round_prompts": ("round", "position", "prompt_id", "system"),
    "candidates": ("id", "round", "prompt_id", "policy", "sample_index", "text", "num_tokens",
                   "finish_reason", "logprob_sum", "source", "parent_id", "meta"),
    "judgments": ("id", "round", "candidate_id", "judge", "sample_index", "score", "raw", "error",
                  "meta"),
    "pairs": ("id", "round", "prompt_id", "chosen_id", "rejected_id", "chosen_score",
              "rejected_score", "margin", "source", "selected"),
    "selected": ("id", "round", "candidate_id", "score", "rank", "label", "group_key"),
    "instructions": ("id", "round", "optimiser", "step", "text", "score", "scored_on", "chosen",
                     "meta"),
    "rewrite_decisions": ("id", "round", "optimiser", "prompt_id", "rewrite_id", "original_score",
                          "rewrite_score", "validation", "kept", "reason"),
    "train_steps": ("id", "round", "step", "loss", "learning_rate", "grad_norm", "metrics"),
    "heldout": ("id", "evaluator", "position", "source", "split", "text", "system", "answer",
                "key", "meta"),
}
# Quoted like sqlite-utils' statements (the kill tests' FAKE_KILL_ON_SQL needles match them).
_SQL = {t: f'insert into "{t}" ({", ".join(cols)}) values ({", ".join("?" * len(cols))})'
        for t, cols in COLUMNS.items()}
_PLAIN = frozenset({str, int, float, bool, bytes, type(None)})


def _bindable(row: tuple) -> tuple:
    """Values as sqlite-utils' ``insert`` stores them (dicts and lists as JSON, dates as
    ISO text); plain values, nearly all of them, pass untouched."""
    if _PLAIN.issuperset(map(type, row)):
        return row
    return tuple(v if type(v) in _PLAIN else sqlite_utils.db.jsonify_if_needed(v) for v in row)


class Rows:
    """One commit's rows, written with one ``executemany`` per table (``Store.batch``).

    Row-by-row inserts cost a statement (and sqlite-utils' table introspection) per row;
    here each table's rows are collected and written at once when the batch ends. Ids are
    given when a record is added, as SQLite itself gives them (one more than the table's
    largest id, read once per table inside the writer's ``BEGIN IMMEDIATE``), in the same
    order the one-row-at-a-time writer used (a record's unstored parent first), so the
    stored rows, ids included, and every record's ``id`` are the same.
    """

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self._rows: dict[str, list[tuple]] = {}
        self._next: dict[str, int] = {}

    def next_id(self, table: str) -> int:
        if table not in self._next:
            (top,) = self.conn.execute(f"select coalesce(max(id), 0) from {table}").fetchone()
            self._next[table] = top + 1
        self._next[table] += 1
        return self._next[table] - 1

    def add(self, table: str, row: tuple) -> None:
        self._rows.setdefault(table, []).append(row)

    def flush(self) -> None:
        for table in COLUMNS:
            rows = self._rows.pop(table, None)
            if rows:
                self.conn.executemany(_SQL[table], [_bindable(r) for r in rows])

    # -- one record each ---------------------------------------------------------

    def prompt(self, p: c.Prompt, round: int) -> int:
        if p.parent is not None and p.parent.id is None:
            self.prompt(p.parent, round)
        p.round = round
        p.id = self.next_id("prompts")
        self.add("prompts", (p.id, round, p.text, p.system, p.source, p.kind,
                             p.parent.id if p.parent else None, _json(p.meta), p.answer))
        return p.id

    def round_prompt(self, round: int, position: int, prompt_id: int, system: str | None) -> None:
        self.add("round_prompts", (round, position, prompt_id, system))

    def candidate(self, cand: c.Candidate, round: int) -> int:
        if cand.parent is not None and cand.parent.id is None:
            self.candidate(cand.parent, round)
        if cand.prompt.id is None:
            self.prompt(cand.prompt, round)
        cand.round = round
        cand.id = self.next_id("candidates")
        self.add("candidates", (cand.id, round, cand.prompt.id, cand.policy, cand.sample_index,
                                cand.text, cand.num_tokens, cand.finish_reason, cand.logprob_sum,
                                cand.source, cand.parent.id if cand.parent else None,
                                _json(cand.meta)))
        return cand.id

    def judgment(self, j: c.Judgment, round: int) -> int:
        if j.candidate.id is None:
            self.candidate(j.candidate, round)
        j.id = self.next_id("judgments")
        self.add("judgments", (j.id, round, j.candidate.id, j.judge, j.sample_index, j.score,
                               j.raw, j.error, _json(j.meta)))
        return j.id

    def pair(self, p: c.Pair, round: int, *, selected: bool) -> int:
        for cand in (p.chosen, p.rejected):
            if cand.id is None:
                self.candidate(cand, round)
        p.id = self.next_id("pairs")
        self.add("pairs", (p.id, round, p.prompt.id, p.chosen.id, p.rejected.id, p.chosen_score,
                           p.rejected_score, p.margin, p.source, int(selected)))
        return p.id

    def selected(self, s: c.Selected, round: int) -> int:
        s.id = self.next_id("selected")
        self.add("selected", (s.id, round, s.candidate.id, s.score, s.rank, s.label, s.group))
        return s.id

    def instruction(self, ins: c.Instruction, round: int) -> int:
        ins.round = round
        ins.id = self.next_id("instructions")
        self.add("instructions", (ins.id, round, ins.optimiser, ins.step, ins.text, ins.score,
                                  ins.scored_on, int(ins.chosen), _json(ins.meta)))
        return ins.id

    def decision(self, d: c.RewriteDecision, round: int) -> int:
        rid = self.next_id("rewrite_decisions")
        self.add("rewrite_decisions", (rid, round, d.optimiser or "", d.prompt.id, d.rewrite.id,
                                       d.original_score, d.rewrite_score, int(d.validation),
                                       int(d.kept), d.reason))
        return rid

    def train_step(self, step: c.TrainStep, round: int) -> int:
        sid = self.next_id("train_steps")
        self.add("train_steps", (sid, round, step.step, step.loss, step.learning_rate,
                                 step.grad_norm, _json(step.metrics)))
        return sid
