"""The store's write path against raw sqlite3 ``executemany``, in the same scratch database.

    python bench/store.py                 # 20,000 candidates + 40,000 judgments, 3 repeats
    python bench/store.py --rows 5000 --repeats 1

A phase writer (loop/runner.py) adds records to ``Store.batch`` inside the phase's
transaction and the batch writes each table with one ``executemany``. This times that path
(records in, rows committed: candidates with their prompts stored, then two judgments per
candidate) against the floor for the same rows: ``conn.executemany`` of ready tuples into
the same tables of the same database, and, for scale, one sqlite-utils ``insert`` per row
(the writer the batches replaced). Printed: rows/s of each, the ratio of the store's to
executemany's (target: the store at >= 100k rows/s), CPU seconds (and rows per CPU second,
the figure a busy machine distorts least) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loop import components as c
from loop.store import Store


def records(round: int, n: int, prompts: list[c.Prompt]):
    cands = [c.Candidate(prompt=prompts[i % len(prompts)], text=f"answer {i} " * 8,
                         sample_index=i % 4, num_tokens=12, finish_reason="stop",
                         logprob_sum=-3.5, meta={}) for i in range(n)]
    judgments = [c.Judgment(candidate=x, score=float(k), raw=f"Score: {k} " * 5, sample_index=k,
                            judge="j") for x in cands for k in range(2)]
    return cands, judgments


def timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="candidates per repeat (2 judgments each)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "run.db")
        conn = store.conn
        with store.transaction() as db:
            db.execute("insert into rounds (round, status) values (0, 'done')")
            with store.batch(db) as b:
                prompts = [c.Prompt(text=f"question {i}", source="bench") for i in range(500)]
                for p in prompts:
                    b.prompt(p, 0)
        results: dict[str, list[tuple[float, float, int]]] = {"store": [], "executemany": [], "row_by_row": []}
        r = 0
        for rep in range(args.repeats):
            for way in ("store", "executemany", "row_by_row"):
                r += 1
                conn.execute("insert into rounds (round, status) values (?, 'running')", [r])
                n = args.rows if way != "row_by_row" else max(args.rows // 10, 1)
                cands, judgments = records(r, n, prompts)
                if way == "store":
                    def go():
                        with store.transaction() as db, store.batch(db) as b:
                            for x in cands:
                                b.candidate(x, r)
                            for j in judgments:
                                b.judgment(j, r)
                elif way == "executemany":
                    # The floor: ready tuples (ids included), one statement per table.
                    (top_c,) = conn.execute("select coalesce(max(id), 0) from candidates").fetchone()
                    (top_j,) = conn.execute("select coalesce(max(id), 0) from judgments").fetchone()
                    crow = [(top_c + 1 + i, r, x.prompt.id, x.policy, x.sample_index, x.text,
                             x.num_tokens, x.finish_reason, x.logprob_sum, x.source, None,
                             json.dumps(x.meta)) for i, x in enumerate(cands)]
                    jrow = [(top_j + 1 + i, r, top_c + 1 + i // 2, j.judge, j.sample_index, j.score,
                             j.raw, j.error, json.dumps(j.meta)) for i, j in enumerate(judgments)]

                    def go():
                        with store.transaction():
                            conn.executemany("insert into candidates (id, round, prompt_id, policy, "
                                             "sample_index, text, num_tokens, finish_reason, "
                                             "logprob_sum, source, parent_id, meta) values "
                                             "(?,?,?,?,?,?,?,?,?,?,?,?)", crow)
                            conn.executemany("insert into judgments (id, round, candidate_id, judge, "
                                             "sample_index, score, raw, error, meta) values "
                                             "(?,?,?,?,?,?,?,?,?)", jrow)
                else:
                    def go():
                        with store.transaction() as db:
                            for x in cands:
                                x.id = db["candidates"].insert({
                                    "round": r, "prompt_id": x.prompt.id, "policy": x.policy,
                                    "sample_index": x.sample_index, "text": x.text,
                                    "num_tokens": x.num_tokens, "finish_reason": x.finish_reason,
                                    "logprob_sum": x.logprob_sum, "source": x.source,
                                    "parent_id": None, "meta": json.dumps(x.meta)}).last_pk
                            for j in judgments:
                                db["judgments"].insert({
                                    "round": r, "candidate_id": j.candidate.id, "judge": j.judge,
                                    "sample_index": j.sample_index, "score": j.score, "raw": j.raw,
                                    "error": j.error, "meta": json.dumps(j.meta)})
                wall, cpu = timed(go)
                rows = len(cands) + len(judgments)
                stored = conn.execute("select count(*) from judgments where round = ?", [r]).fetchone()[0]
                assert stored == len(judgments), (way, stored)
                results[way].append((wall, cpu, rows))
        store.close()
    print(f"rows per repeat: {args.rows} candidates + {2 * args.rows} judgments "
          f"(row by row: a tenth of that); {args.repeats} repeats, best shown")
    rate = {}
    for way, runs in results.items():
        wall, cpu, rows = min(runs, key=lambda x: x[0] / x[2])
        rate[way] = rows / wall
        print(f"  {way:12s} {rate[way]:>10,.0f} rows/s   wall {wall:.3f} s   cpu {cpu:.3f} s "
              f"({rows / max(cpu, 1e-9):,.0f} rows per CPU second)   ({rows} rows)")
    print(f"store / executemany: {rate['store'] / rate['executemany']:.2f}x   "
          f"store / row by row: {rate['store'] / rate['row_by_row']:.1f}x   "
          f"target: store >= 100,000 rows/s ({'met' if rate['store'] >= 100_000 else 'NOT met'})")
    print(f"loadavg: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  cpu total: {time.process_time():.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
