"""glibc's default malloc settings against selfloop's (loop/malloc.py), in one run.

    python bench/malloc.py                       # both parts, 3 alternating runs a side
    python bench/malloc.py --part rounds --repeats 5 --config vllm_demo

- **tensors**: a child process makes and frees float32 tensors of a few sizes (1, 8, 40
  and 100 MiB) ``--cycles`` times each, after ten cycles not counted, and prints the page
  faults and the seconds per cycle, with glibc's defaults (``SELFLOOP_MALLOC=default``) and with ``malloc.tune()``;
- **rounds**: ``--rounds`` rounds of ``configs/<config>.toml`` (default cai_demo), each
  side in its own ``python -m loop run``; per side the fastest generate, judge and update
  phase (summed over the rounds, from run.db), the run's user and system CPU seconds,
  minor page faults and peak RSS (``wait4``), and the load average at the start and end.

The two sides alternate (who goes first alternates too); the seed model is linked from
``--cache`` (default runs/.cache) or built once.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = {"default": {"SELFLOOP_MALLOC": "default"}, "tuned": {}}
SIZES_MIB = (1, 8, 40, 100)

TENSORS = r"""
import json, resource, sys, time
from loop import malloc
print(json.dumps({"malloc": malloc.tune()}), flush=True)
import torch
cycles = int(sys.argv[1])
out = {}
for mib in %r:
    n = mib * (1 << 20) // 4
    for _ in range(10):  # the heap settles in the first few cycles: not counted
        x = torch.ones(n)
        del x
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(cycles):
        x = torch.ones(n)  # written whole, as an op's output is
        del x
    out[mib] = ((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / cycles,
                (time.perf_counter() - t0) / cycles)
print(json.dumps(out))
""" % (SIZES_MIB,)


def env_for(side: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("SELFLOOP_MALLOC", None)
    env.update(SIDES[side])
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def waited(cmd: list[str], env: dict) -> tuple[str, str, object]:
    """Run ``cmd``; its output and its own resource usage (``wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return stdout, stderr, usage


def tensors(args) -> None:
    got = {}
    for side in SIDES:
        stdout, _, _ = waited([sys.executable, "-c", TENSORS, str(args.cycles)], env_for(side))
        lines = stdout.strip().splitlines()
        got[side] = (json.loads(lines[0])["malloc"], json.loads(lines[-1]))
    print(f"tensors: make and free one float32 tensor, {args.cycles} cycles per size "
          f"(load {os.getloadavg()[0]:.2f})")
    print("| size MiB | faults/cycle default | faults/cycle tuned | ms/cycle default | ms/cycle tuned | ratio |")
    print("|---|---|---|---|---|---|")
    for mib in SIZES_MIB:
        (fd, td), (ft, tt) = got["default"][1][str(mib)], got["tuned"][1][str(mib)]
        print(f"| {mib} | {fd:.0f} | {ft:.0f} | {td * 1e3:.2f} | {tt * 1e3:.2f} | {td / tt:.2f}x |")
    print(f"tuned side: {got['tuned'][0]}; default side: {got['default'][0]}")


def one_round(args, side: str, runs: Path, tag: str) -> dict:
    name = f"{side}-{tag}"
    cmd = [sys.executable, "-m", "loop", "run", f"configs/{args.config}.toml", "--progress", "off",
           "--set", f"rounds={args.rounds}", "--set", f"runs_dir={runs}", "--set", f"name={name}"]
    load0 = os.getloadavg()[0]
    _, _, usage = waited(cmd, env_for(side))
    db = sqlite3.connect(runs / name / "run.db")
    phases = dict(db.execute("select phase, sum(seconds) from phases where round >= 1 "
                             "group by phase").fetchall())
    db.close()
    return {"phases": phases, "user": usage.ru_utime, "sys": usage.ru_stime,
            "faults": usage.ru_minflt, "rss_mb": usage.ru_maxrss / 1024,
            "load": (load0, os.getloadavg()[0])}


def rounds(args) -> None:
    with tempfile.TemporaryDirectory(prefix="selfloop-bench-malloc-") as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        if args.cache.is_dir():
            (runs / ".cache").symlink_to(args.cache.resolve())
        got: dict[str, list[dict]] = {side: [] for side in SIDES}
        for rep in range(args.repeats):
            for side in list(SIDES) if rep % 2 == 0 else list(SIDES)[::-1]:
                got[side].append(one_round(args, side, runs, str(rep)))
    print(f"\nrounds: configs/{args.config}.toml, {args.rounds} rounds, {args.repeats} alternating "
          "runs a side (phases summed over the rounds; fastest run of each side)")
    print("| side | generate s | judge s | update s | user CPU s | system CPU s | minor faults "
          "| peak RSS MB | load at start -> end |")
    print("|---|---|---|---|---|---|---|---|---|")
    best = {}
    for side, runs_ in got.items():
        for r in runs_:
            p = r["phases"]
            print(f"| {side} | {p.get('generate', 0):.2f} | {p.get('judge', 0):.2f} | "
                  f"{p.get('update', 0):.2f} | {r['user']:.1f} | {r['sys']:.2f} | {r['faults']:,} | "
                  f"{r['rss_mb']:.0f} | {r['load'][0]:.2f} -> {r['load'][1]:.2f} |")
        best[side] = {k: min(r["phases"].get(k, 0) for r in runs_) for k in ("judge", "update")}
        best[side]["sys"] = min(r["sys"] for r in runs_)
        best[side]["cpu"] = min(r["user"] + r["sys"] for r in runs_)
    d, t = best["default"], best["tuned"]
    print(f"default/tuned (fastest of each): judge {d['judge'] / t['judge']:.2f}x, update "
          f"{d['update'] / t['update']:.2f}x, system CPU {d['sys'] / t['sys']:.2f}x, "
          f"whole run's CPU {d['cpu'] / t['cpu']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["tensors", "rounds", "both"], default="both")
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--config", default="cai_demo")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / ".cache",
                    help="a runs/.cache holding the seed model (else it is built once)")
    args = ap.parse_args()
    if args.part in ("tensors", "both"):
        tensors(args)
    if args.part in ("rounds", "both"):
        rounds(args)


if __name__ == "__main__":
    main()
