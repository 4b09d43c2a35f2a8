"""Beyond one process: what spreading a run over processes costs and gains.

    python bench/scale.py --part update                      # DPO, 24 optimizer steps
    python bench/scale.py --part update --max-steps 6 --repeats 1 --per-round 16

``--part update`` (``update_overhead``): the update phase of one tiny-world DPO round,
in-process and under ``accelerate launch`` with 1 and 2 processes, data parallel, and 2
FSDP2 processes (``[updater] launch``, loop/launch.py). A round is run once in-process (the seed model cached under
``--runs-dir``); each mode then re-runs its update phase on a copy of that run
(``selfloop resume --redo round-1.update``, reference log-probs recomputed), and the
update phase's own seconds are read from the run's ``phases`` table. Printed per mode:
the median seconds, the ratio to in-process (the launch overhead: starting the launcher
and the ranks, each importing torch and loading the model, plus gloo all-reduces), CPU
seconds of the resumed process and its children, and the load average beside it. On a
2-core machine 2 ranks share the cores with everything else: the ratio measures the
mechanics' overhead, not a speed-up (a GPU per rank is where a speed-up comes from).

``--part servers``: round wall time on 1 vs 2 vLLM servers (written on the ``server``
branch; merged here by the lead).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LORA = ('learning_rate=1e-3, batch_size=8, lora_r=8, lora_alpha=16, lora_dropout=0.0, '
        'warmup_ratio=0.0, scheduler="constant"')


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1"}


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _update_seconds(run_dir: Path) -> float:
    conn = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    try:
        return conn.execute("select seconds from phases where round = 1 and phase = 'update'"
                            ).fetchone()[0]
    finally:
        conn.close()


def _base_run(args) -> Path:
    runs = Path(args.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    name = "scale-update-base"
    if (runs / name).exists():
        shutil.rmtree(runs / name)
    cmd = [sys.executable, "-m", "loop", "run", str(ROOT / "configs" / "demo.toml"),
           "--progress", "off", "--set", f"runs_dir={runs}", "--set", f"name={name}",
           "--set", "rounds=1", "--set", "model.build.steps=250",
           "--set", f"prompts.0.per_round={args.per_round}", "--set", "evaluators.0.heldout=20",
           "--set", "judges.0.samples=1", "--set", "generate.n=3",
           "--set", 'selector={name="pairs"}',
           "--set", f'updater={{name="dpo", {LORA}, max_steps={args.max_steps}}}']
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(args.threads), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the base run failed:\n{proc.stderr[-3000:]}")
    return runs / name


def update_overhead(args) -> list[dict]:
    """The update phase in-process vs launched (1 and 2 processes); prints a table and
    returns its rows."""
    base = _base_run(args)
    ddp = ROOT / "configs" / "accelerate" / "ddp.yaml"
    fsdp2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
    modes = [("in-process", None, args.threads),
             ("launched x1", "updater.launch={num_processes=1}", args.threads),
             ("launched x2", f'updater.launch={{num_processes=2, config_file="{ddp}"}}',
              max(1, args.threads // 2)),
             ("fsdp2 x2", f'updater.launch={{num_processes=2, config_file="{fsdp2}"}}',
              max(1, args.threads // 2))]
    rows = []
    for label, launch, threads in modes:
        seconds, cpu = [], []
        for i in range(args.repeats):
            run = base.parent / f"scale-update-{label.replace(' ', '-')}-{i}"
            if run.exists():
                shutil.rmtree(run)
            shutil.copytree(base, run)
            shutil.rmtree(run / "cache", ignore_errors=True)
            cmd = [sys.executable, "-m", "loop", "resume", str(run), "--progress", "off",
                   "--redo", "round-1.update"]
            if launch:
                cmd += ["--set", launch]
            c0 = _cpu_children()
            proc = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
            cpu.append(_cpu_children() - c0)
            seconds.append(_update_seconds(run))
            shutil.rmtree(run)
        rows.append({"mode": label, "threads_per_process": threads,
                     "update_s": statistics.median(seconds), "cpu_s": statistics.median(cpu)})
    ref = rows[0]["update_s"]
    for row in rows:
        row["ratio"] = row["update_s"] / ref
    load = os.getloadavg()
    print(f"update phase, DPO on the tiny world: {args.max_steps} steps, {args.per_round} prompts "
          f"x 3 answers, median of {args.repeats}; loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'mode':<12} {'threads/proc':>12} {'update s':>9} {'x in-proc':>9} {'CPU s (run)':>12}")
    for row in rows:
        print(f"{row['mode']:<12} {row['threads_per_process']:>12} {row['update_s']:>9.2f} "
              f"{row['ratio']:>9.2f} {row['cpu_s']:>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"loadavg": load, "rows": rows}, indent=2))
    shutil.rmtree(base)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["update", "servers"], required=True)
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-scale"),
                   help="where the runs (and the cached seed model) go")
    p.add_argument("--max-steps", type=int, default=24, help="optimizer steps of the update")
    p.add_argument("--per-round", type=int, default=32, help="prompts in the round")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode (the median is printed)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (split across ranks)")
    p.add_argument("--json", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.part == "update":
        update_overhead(args)
    else:
        sys.exit("--part servers lives on the server branch (the lead merges it here)")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s in all)")
