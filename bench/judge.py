"""The judge phase of the demos, before and after batching it, in one run.

    python bench/judge.py                         # both demos, their own sizes
    python bench/judge.py --prompts 16            # small: 16 prompts a round
    python bench/judge.py --configs cai_demo --repeats 2

For each config (configs/cai_demo.toml on the hf generator, configs/vllm_demo.toml on
vLLM) it runs one round twice in a scratch runs folder, each in its own subprocess:

- **before**: the judge as on main before issue 18: labels scored one ``logprobs`` row
  per (chat, label) (bench/per_row.py: ``hf_per_row`` packs them into 1024-token rows,
  ``vllm_per_row`` makes one prompt-logprobs engine call per row), the RL-CAI judge's
  ``batch_size`` in rows (64 rows = 32 chats), vLLM's default engine sizes (``block_size``
  128, ``max_num_seqs`` 256 on CPU) and the configs' old judge batch sizes;
  and main's thread policy then: libgomp's default spin (``GOMP_SPINCOUNT=300000``, what
  an unset ``OMP_WAIT_POLICY`` means) and torch's thread count, fixed (no governor),
  with glibc's default malloc settings (``SELFLOOP_MALLOC=default``, loop/malloc.py);
- **after**: the config as shipped, with selfloop's thread policy (loop/threads.py).

It reads the judge phase's seconds from each run's run.db and its CPU seconds (the
process's, every thread, from bench/per_row.py's phase hooks), prints both with their
ratios, the CPU seconds of each whole run (RUSAGE_CHILDREN), ``os.getloadavg()`` before
and after, and, on vLLM, the judge phase's prefix-cache hit rate
(``vllm/judge/prefix_cache_hit_rate``). The two sides alternate over ``--repeats`` (who
goes first alternates too) and the fastest judge phase of each side counts. The seed
model is built once (or linked from ``--cache``, default runs/.cache).
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each config's judge looked like before (as --set overrides).
BEFORE = {
    "cai_demo": ["--plugin", "bench/per_row.py", "--set", 'generator.name="hf_per_row"',
                 "--set", "generator.batch_size=96", "--set", "judges.1.batch_size=192",
                 "--set", "judges.2.batch_size=32"],
    "vllm_demo": ["--plugin", "bench/per_row.py", "--set", 'generator.name="vllm_per_row"',
                  "--set", "generator.block_size=128", "--set", "generator.max_num_seqs=256",
                  "--set", "judges.0.batch_size=192"],
}


# main's thread policy before issue 18: libgomp's default spin, torch's default count.
BEFORE_ENV = {"GOMP_SPINCOUNT": "300000", "SELFLOOP_THREADS": str(os.cpu_count() or 1),
              "SELFLOOP_MALLOC": "default"}  # and glibc's malloc settings (loop/malloc.py)


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(config: str, side: str, runs: Path, tag: str, prompts: int | None,
             heldout: int) -> dict:
    name = f"{config.replace('_', '-')}-{side}-{tag}"
    cmd = [sys.executable, "-m", "loop", "run", f"configs/{config}.toml", "--progress", "off",
           "--set", "rounds=1", "--set", f"runs_dir={runs}", "--set", f"name={name}",
           "--set", f"evaluators.0.heldout={heldout}"]
    if prompts:
        cmd += ["--set", f"prompts.0.per_round={prompts}"]
    cmd += BEFORE[config] if side == "before" else ["--plugin", "bench/per_row.py"]
    cpu_file = runs / f"{name}.cpu"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", BENCH_JUDGE_CPU=str(cpu_file))
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SELFLOOP_THREADS", "SELFLOOP_MALLOC"):
        env.pop(key, None)
    if side == "before":
        env.update(BEFORE_ENV)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    load0, cpu0 = os.getloadavg()[0], cpu_children()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    cpu, load1 = cpu_children() - cpu0, os.getloadavg()[0]
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    db = sqlite3.connect(runs / name / "run.db")
    (seconds,) = db.execute(
        "select seconds from phases where round = 1 and phase = 'judge'").fetchone()
    hit = db.execute("select value from metrics where round = 1 and "
                     "name = 'vllm/judge/prefix_cache_hit_rate'").fetchone()
    db.close()
    judge_cpu = float(cpu_file.read_text().split()[1])
    return {"judge_s": seconds, "judge_cpu_s": judge_cpu, "cpu_s": cpu, "load": (load0, load1),
            "hit_rate": hit[0] if hit else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["cai_demo", "vllm_demo"],
                    choices=sorted(BEFORE))
    ap.add_argument("--prompts", type=int, default=None, help="prompts per round (default: the config's)")
    ap.add_argument("--heldout", type=int, default=20, help="held-out prompts evaluated (not timed)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / ".cache",
                    help="a runs/.cache holding the seed model (else it is built once)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="selfloop-bench-judge-") as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        if args.cache.is_dir():
            (runs / ".cache").symlink_to(args.cache.resolve())
        for config in args.configs:
            got: dict[str, list[dict]] = {"before": [], "after": []}
            for rep in range(args.repeats):
                order = ("before", "after") if rep % 2 == 0 else ("after", "before")
                for side in order:
                    got[side].append(run_once(config, side, runs, str(rep), args.prompts,
                                              args.heldout))
            print(f"\n{config}: judge phase of round 1 ({args.prompts or 'config'} prompts)")
            best = {}
            for side in ("before", "after"):
                for r in got[side]:
                    hit = "" if r["hit_rate"] is None else f", prefix-cache hit rate {r['hit_rate']:.2f}"
                    print(f"  {side:6s} judge {r['judge_s']:7.2f} s wall, {r['judge_cpu_s']:7.2f} CPU s  "
                          f"(whole run: {r['cpu_s']:6.1f} CPU s; load {r['load'][0]:.2f} -> "
                          f"{r['load'][1]:.2f}{hit})")
                best[side] = (min(r["judge_s"] for r in got[side]),
                              min(r["judge_cpu_s"] for r in got[side]))
            print(f"  ratio before/after (fastest of each): wall {best['before'][0] / best['after'][0]:.2f}x, "
                  f"CPU {best['before'][1] / best['after'][1]:.2f}x")


if __name__ == "__main__":
    main()
