"""The run database: the documented schema, WAL, foreign keys, migrations, read-only
readers and BEGIN IMMEDIATE transactions. Real SQLite files throughout."""

from __future__ import annotations

import re
import sqlite3

import pytest
import sqlite_utils
from sqlite_utils import Migrations

from loop import migrations as mig
from loop.store import Store
from tests.core_helpers import ROOT, run_inprocess, write_config

DOC = ROOT / "docs" / "database.md"




def documented_tables() -> dict[str, list[tuple[str, str]]]:
    """``{table: [(column, TYPE[ NOT NULL]), ...]}`` parsed from docs/database.md."""
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        m = re.match(r"^### `(\w+)`\s*$", line)
        if m:
            current = m.group(1)
            tables[current] = []
            continue
        m = re.match(r"^\| `(\w+)` \| ([A-Z ]+) \|", line)
        if m and current is not None:
            tables[current].append((m.group(1), m.group(2).strip()))
    return tables


def actual_tables(conn: sqlite3.Connection) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for (name,) in conn.execute("select name from sqlite_master where type = 'table' "
                                "and name not like 'sqlite_%' and name != '_sqlite_migrations'"):
        out[name] = [
            (col, typ.upper() + (" NOT NULL" if notnull else ""))
            for _, col, typ, notnull, _, _ in conn.execute(f'pragma table_info("{name}")')
        ]
    return out


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "run.db")
    yield s
    s.close()


def test_blank_database_has_exactly_the_documented_columns(store):
    doc = documented_tables()
    assert len(doc) >= 10 and all(doc.values())
    assert actual_tables(store.conn) == doc


def test_design_tables_exist(store):
    tables = set(actual_tables(store.conn))
    assert {"runs", "rounds", "phases", "prompts", "candidates", "judgments", "pairs",
            "train_steps", "metrics", "events"} <= tables


def test_wal_and_foreign_keys(store, tmp_path):
    assert store.conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("pragma foreign_keys").fetchone()[0] == 1
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        with store.transaction() as db:
            db["rounds"].insert({"round": 1, "status": "running"})
            db["candidates"].insert({"round": 1, "prompt_id": 999, "policy": "base",
                                     "sample_index": 0, "text": "x", "source": "policy"})
    assert store.rows("select count(*) n from rounds")[0]["n"] == 0  # rolled back whole
    # WAL is a property of the file: a second plain connection sees it too.
    other = sqlite3.connect(tmp_path / "run.db")
    assert other.execute("pragma journal_mode").fetchone()[0] == "wal"
    other.close()


# Every numbered migration the module defines, in order.
ALL = sorted(n for n in vars(mig) if re.match(r"m\d{3}_", n))


def test_migrations_are_recorded_and_idempotent(store, tmp_path):
    applied = [m.name for m in mig.migrations.applied(store.db)]
    assert applied == ALL and ALL[:3] == ["m001_initial", "m002_instructions", "m003_answers_heldout"]
    schema = sorted(store.conn.execute("select name, sql from sqlite_master").fetchall(), key=str)
    mig.migrations.apply(store.db)  # again: nothing pending, nothing changes
    assert mig.migrations.pending(store.db) == []
    assert sorted(store.conn.execute("select name, sql from sqlite_master").fetchall(), key=str) == schema
    assert store.rows("select count(*) n from _sqlite_migrations")[0]["n"] == len(ALL)
    store.close()
    again = Store.open(tmp_path / "run.db")  # re-opening an existing run: a no-op
    assert [m.name for m in mig.migrations.applied(again.db)] == ALL
    again.close()


def test_upgrade_from_an_older_schema(tmp_path):
    """A database of the m001 + m002 release is upgraded in place by every later
    migration (m003: prompts.answer, heldout), its data kept."""
    path = tmp_path / "old.db"
    older = Migrations("selfloop")
    older()(mig.m001_initial)
    older()(mig.m002_instructions)
    db = sqlite_utils.Database(path)
    older.apply(db)
    db["rounds"].insert({"round": 0, "status": "done"})
    db["metrics"].insert({"round": 0, "name": "eval/accuracy", "value": 0.5})
    db["prompts"].insert({"round": 0, "text": "q", "source": "s", "kind": "original"})
    assert [m.name for m in mig.migrations.pending(db)] == ALL[2:]
    mig.migrations.apply(db)
    assert [m.name for m in mig.migrations.applied(db)] == ALL
    assert "answer" in db["prompts"].columns_dict and "heldout" in db.table_names()
    assert list(db.query("select name, value from metrics")) == [{"name": "eval/accuracy", "value": 0.5}]
    assert list(db.query("select text, answer from prompts")) == [{"text": "q", "answer": None}]
    mig.migrations.apply(db)  # idempotent
    assert len(mig.migrations.applied(db)) == len(ALL)
    db.close()


def test_readers_open_read_only(store, tmp_path):
    with store.transaction() as db:
        db["rounds"].insert({"round": 0, "status": "done"})
    reader = Store.open_readonly(tmp_path / "run.db")
    try:
        assert reader.rounds()[0]["status"] == "done"
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.conn.execute("insert into rounds (round, status) values (1, 'x')")
        with pytest.raises(AssertionError, match="read-only"):
            with reader.transaction():
                pass
    finally:
        reader.close()
    with pytest.raises(FileNotFoundError):
        Store.open_readonly(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_begin_immediate_rolls_back_everything(store, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction() as db:
            db["rounds"].insert({"round": 1, "status": "running"})
            db["events"].insert({"time": "t", "level": "info", "message": "m"})
            assert store.conn.in_transaction
            raise RuntimeError("boom")
    assert not store.conn.in_transaction
    assert store.rows("select count(*) n from rounds")[0]["n"] == 0
    assert store.rows("select count(*) n from events")[0]["n"] == 0


def test_begin_immediate_takes_the_write_lock_at_once(store, tmp_path):
    """A second writer cannot even begin while a transaction is open; readers still read."""
    with store.transaction() as db:
        db["rounds"].insert({"round": 0, "status": "running"})
        other = sqlite3.connect(tmp_path / "run.db", timeout=0.1, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
        reader = Store.open_readonly(tmp_path / "run.db")
        assert reader.rounds() == []  # the uncommitted row is invisible, and nobody waits
        reader.close()
    reader = Store.open_readonly(tmp_path / "run.db")
    assert [r["round"] for r in reader.rounds()] == [0]
    reader.close()


def test_documented_queries_run_on_a_real_run(tmp_path):
    run_dir = run_inprocess(write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=1,
                                         per_round=3, n=2))
    conn = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    queries = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
    assert len(queries) >= 4
    results = [conn.execute(q).fetchall() for q in queries]
    assert [r[0] for r in results[0]] == [0, 1] and all(isinstance(r[1], float) for r in results[0])
    prompt, chosen, rejected = results[1][0][1:4]
    assert isinstance(prompt, str) and chosen != rejected
    assert results[2] and all(row[2] >= 1 and row[3] == "garbage" for row in results[2])
    conn.close()


def test_m001_database_gains_the_instructions_table(tmp_path):
    """A run made before m002 (instruction search) opens with the new table, data kept."""
    path = tmp_path / "m001.db"
    only_m001 = Migrations("selfloop")
    only_m001()(mig.m001_initial)
    db = sqlite_utils.Database(path)
    only_m001.apply(db)
    db["rounds"].insert({"round": 0, "status": "done"})
    db.close()
    store = Store.open(path)
    try:
        assert [m.name for m in mig.migrations.applied(store.db)] == ALL
        assert "instructions" in actual_tables(store.conn)
        assert store.rows("select round from rounds") == [{"round": 0}]
        # m004: the rounds gain their reference and deployed system prompt, data kept
        assert store.rows("select round, reference, system from rounds") == [
            {"round": 0, "reference": None, "system": None}]
    finally:
        store.close()


# -- batched writes: the same rows as one insert per row ------------------------------


class _RowByRow:
    """The writer the batches replaced: one sqlite-utils insert per row, ids from SQLite."""

    def __init__(self, db):
        self.db = db

    def prompt(self, p, r):
        if p.parent is not None and p.parent.id is None:
            self.prompt(p.parent, r)
        p.id = self.db["prompts"].insert({
            "round": r, "text": p.text, "system": p.system, "source": p.source, "kind": p.kind,
            "parent_id": p.parent.id if p.parent else None, "meta": _j(p.meta),
            "answer": p.answer}).last_pk

    def candidate(self, x, r):
        if x.parent is not None and x.parent.id is None:
            self.candidate(x.parent, r)
        if x.prompt.id is None:
            self.prompt(x.prompt, r)
        x.id = self.db["candidates"].insert({
            "round": r, "prompt_id": x.prompt.id, "policy": x.policy,
            "sample_index": x.sample_index, "text": x.text, "num_tokens": x.num_tokens,
            "finish_reason": x.finish_reason, "logprob_sum": x.logprob_sum, "source": x.source,
            "parent_id": x.parent.id if x.parent else None, "meta": _j(x.meta)}).last_pk

    def judgment(self, j, r):
        if j.candidate.id is None:
            self.candidate(j.candidate, r)
        j.id = self.db["judgments"].insert({
            "round": r, "candidate_id": j.candidate.id, "judge": j.judge,
            "sample_index": j.sample_index, "score": j.score, "raw": j.raw, "error": j.error,
            "meta": _j(j.meta)}).last_pk

    def pair(self, p, r, selected):
        for x in (p.chosen, p.rejected):
            if x.id is None:
                self.candidate(x, r)
        p.id = self.db["pairs"].insert({
            "round": r, "prompt_id": p.prompt.id, "chosen_id": p.chosen.id,
            "rejected_id": p.rejected.id, "chosen_score": p.chosen_score,
            "rejected_score": p.rejected_score, "margin": p.margin, "source": p.source,
            "selected": int(selected)}).last_pk

    def selected(self, s, r):
        s.id = self.db["selected"].insert({
            "round": r, "candidate_id": s.candidate.id, "score": s.score, "rank": s.rank,
            "label": s.label, "group_key": s.group}).last_pk

    def train_step(self, t, r):
        self.db["train_steps"].insert({
            "round": r, "step": t.step, "loss": t.loss, "learning_rate": t.learning_rate,
            "grad_norm": t.grad_norm, "metrics": _j(t.metrics)})


def _j(value):
    import json
    return json.dumps(value, sort_keys=True, default=str)


def _records():
    """A round's worth of linked records, none stored: derived prompts (a parent chain),
    candidates whose prompt is unstored, revisions of unstored originals, judgments of
    unstored candidates, pairs, selections and steps; unicode, NULLs and JSON meta."""
    import loop

    root = loop.Prompt(text="root ü", source="s", meta={"k": [1, 2]})
    mid = loop.Prompt(text="mid", source="s", kind="derived", parent=root)
    prompts = [loop.Prompt(text=f"q{i}", source="s", system="sys" if i % 3 else None,
                           kind="derived", parent=mid if i % 2 else None,
                           answer=None if i % 4 else "ans") for i in range(40)]
    cands = [loop.Candidate(prompt=p, text=f"a{i}.{k}", sample_index=k, num_tokens=k + 1,
                            finish_reason="stop", logprob_sum=-0.5 * k, meta={"i": i})
             for i, p in enumerate(prompts) for k in range(4)]
    revisions = [loop.Candidate(prompt=x.prompt, text=x.text + " (revised)", source="revision",
                                parent=x) for x in cands[::7]]
    judgments = [loop.Judgment(candidate=x, score=None if i % 11 == 0 else float(i % 5),
                               raw=f"Score: {i % 5}", sample_index=i % 2, judge="j",
                               error="unparseable" if i % 11 == 0 else None)
                 for i, x in enumerate(revisions + cands)]
    pairs = [loop.Pair(prompt=cands[i].prompt, chosen=cands[i], rejected=cands[i + 1],
                       chosen_score=2.0, rejected_score=None if i % 8 else 1.0)
             for i in range(0, len(cands), 4)]
    sel = [loop.Selected(candidate=x, score=1.5, rank=i % 4, label="ranked", group=x.prompt.id)
           for i, x in enumerate(cands[:30])]
    steps = [loop.TrainStep(step=s, loss=1.0 / (s + 1), learning_rate=1e-3,
                            metrics={"rewards/margin": s}) for s in range(5)]
    return prompts, cands, revisions, judgments, pairs, sel, steps


def _write_round(store, writer, r):
    prompts, cands, revisions, judgments, pairs, sel, steps = _records()
    with store.transaction() as db:
        db.execute("insert or ignore into rounds (round, status) values (?, 'running')", [r])
        w = writer(db)
        for p in prompts[:10]:
            w.prompt(p, r)
        for x in cands:  # prompts[10:] are stored through their candidates
            w.candidate(x, r)
        for j in judgments:  # revisions (and their originals' order) through their judgments
            w.judgment(j, r)
        for p in pairs:
            w.pair(p, r, selected=True)
        for s in sel:
            w.selected(s, r)
        for t in steps:
            w.train_step(t, r)
        getattr(w, "flush", lambda: None)()
    return [x.id for x in (*prompts, *cands, *revisions, *judgments, *pairs, *sel)]


def _dump(store) -> dict:
    return {t: [tuple(r) for r in store.conn.execute(f"select * from {t} order by rowid")]
            for t in ("prompts", "candidates", "judgments", "pairs", "selected", "train_steps")}


def test_batched_writes_store_the_same_rows_and_ids(tmp_path):
    """Store.batch (ids given ahead, one executemany per table) against one sqlite-utils
    insert per row: three rounds, the last after the newest rows were deleted (SQLite then
    reuses their ids), every table and every record's id equal."""
    from loop.store import Rows

    a, b = Store.open(tmp_path / "a.db"), Store.open(tmp_path / "b.db")
    try:
        ids = {}
        for s, name in ((a, "rows"), (b, "batch")):
            writer = _RowByRow if name == "rows" else (lambda db, s=s: Rows(s.conn))
            got = [_write_round(s, writer, 1), _write_round(s, writer, 2)]
            with s.transaction() as db:
                db.execute("pragma defer_foreign_keys = on")
                for t in ("selected", "pairs", "judgments", "candidates", "prompts", "train_steps"):
                    db.execute(f"delete from {t} where round = 2")
            got.append(_write_round(s, writer, 3))
            ids[name] = got
        assert ids["rows"] == ids["batch"]
        assert all(i is not None for i in ids["batch"][2])
        dumped = _dump(b)
        assert _dump(a) == dumped
        assert len(dumped["judgments"]) == 2 * len(_records()[3])
    finally:
        a.close()
        b.close()


def test_put_metrics_upserts_like_before(store):
    with store.transaction() as db:
        db.execute("insert into rounds (round, status) values (1, 'running')")
        store.put_metrics(db, 1, {"x/a": 1, "x/b": None}, "one", "judge")
        store.put_metrics(db, 1, {"x/a": 2.5}, "two", "select")
    rows = store.rows("select round, name, value, source, phase from metrics order by name")
    assert rows == [{"round": 1, "name": "x/a", "value": 2.5, "source": "two", "phase": "select"},
                    {"round": 1, "name": "x/b", "value": None, "source": "one", "phase": "judge"}]
