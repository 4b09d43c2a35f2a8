"""The demo's targets, measured: accuracy gain, wall time cold and cached, completeness.

    python bench/demo.py            # cold cache, then cached (two full demos)
    python bench/demo.py --cached   # only the cached run (reuses runs/.cache)

Runs `selfloop demo` in subprocesses, in a scratch runs folder (cold: a new empty cache,
so the tiny model is built and seed-trained too), then reads the run database and prints
the per-round table plus each target with its measured value:

- eval/accuracy of the last round at least 15 points above round 0's;
- the whole demo under 300 s with a cold cache, under 180 s with the cache warm;
- every prompt, candidate, judgment (with raw text), pair and training step stored and
  linked to its source.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loop.report import report_data  # noqa: E402
from loop.store import Store  # noqa: E402


def run_demo(runs_dir: Path, rounds: int, seed: int | None) -> float:
    cmd = [sys.executable, "-m", "loop", "demo", "--progress", "off", "--rounds", str(rounds),
           "--set", f"runs_dir={runs_dir}"]
    if seed is not None:
        cmd += ["--set", f"seed={seed}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def completeness(store: Store) -> list[tuple[str, int]]:
    """Counts of rows that fail to link to their source (all must be 0)."""
    q = lambda sql: store.rows(sql)[0]["n"]  # noqa: E731
    return [
        ("candidates without their prompt",
         q("select count(*) n from candidates c left join prompts p on p.id = c.prompt_id where p.id is null")),
        ("judgments without their candidate or raw text",
         q("select count(*) n from judgments j left join candidates c on c.id = j.candidate_id "
           "where c.id is null or j.raw is null")),
        ("pairs whose candidates answer another prompt",
         q("select count(*) n from pairs p join candidates a on a.id = p.chosen_id "
           "join candidates b on b.id = p.rejected_id "
           "where a.prompt_id != p.prompt_id or b.prompt_id != p.prompt_id")),
        ("rounds with pairs but no training steps",
         q("select count(*) n from (select distinct round from pairs where selected = 1) r "
           "where not exists (select 1 from train_steps t where t.round = r.round)")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cached", action="store_true", help="skip the cold-cache run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=None, help="override the demo's run seed")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    with tempfile.TemporaryDirectory(prefix="selfloop-bench-") as tmp:
        runs_dir = Path(tmp) / "runs" if not args.cached else ROOT / "runs"
        cold = None
        if not args.cached:
            cold = run_demo(runs_dir, args.rounds, args.seed)
        cached = run_demo(runs_dir, args.rounds, args.seed)
        store = Store.open_readonly(runs_dir / "demo" / "run.db")
        try:
            rows = report_data(store)
            links = completeness(store)
            counts = {t: store.rows(f"select count(*) n from {t}")[0]["n"]
                      for t in ("prompts", "candidates", "judgments", "pairs", "train_steps")}
        finally:
            store.close()

    print(f"{'round':>5} {'accuracy':>9} {'judge agr.':>10} {'pairs':>6} {'margin':>7} "
          f"{'length':>7} {'seconds':>8}")
    for r in rows:
        f = lambda v, pct=False: "-" if v is None else (f"{v * 100:.1f}%" if pct else f"{v:.2f}")  # noqa: E731
        print(f"{r['round']:>5} {f(r['accuracy'], True):>9} {f(r['judge_agreement'], True):>10} "
              f"{f(r['pairs']):>6} {f(r['reward_margin']):>7} {f(r['mean_length']):>7} "
              f"{f(r['seconds']):>8}")
    first, last = rows[0]["accuracy"], rows[-1]["accuracy"]
    gain = (last - first) * 100
    print()
    print(f"accuracy gain round 0 -> {rows[-1]['round']}: {gain:+.1f} points (target >= +15): "
          f"{'PASS' if gain >= 15 else 'FAIL'}")
    if cold is not None:
        print(f"demo wall time, cold cache: {cold:.0f} s (target < 300 s, ratio {cold / 300:.2f}): "
              f"{'PASS' if cold < 300 else 'FAIL'}")
    print(f"demo wall time, cached model: {cached:.0f} s (target < 180 s, ratio {cached / 180:.2f}): "
          f"{'PASS' if cached < 180 else 'FAIL'}")
    print("stored: " + ", ".join(f"{n} {t}" for t, n in counts.items()))
    for label, n in links:
        print(f"{label}: {n} {'PASS' if n == 0 else 'FAIL'}")


if __name__ == "__main__":
    main()
