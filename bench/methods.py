"""Every method on the tiny world, side by side: held-out accuracy per round, gain, training
units, seconds.

    python bench/methods.py                      # every method, seeds 0 1 2, 2 rounds
    python bench/methods.py --seeds 0 --methods dpo opro bpo
    python bench/methods.py --recipe short       # the tests' 250-step seed model (faster)
    python bench/methods.py --quick              # 32 prompts a round, 100 held out, 10 steps

Each method is one `selfloop run` (a subprocess) of configs/demo.toml or the config it is
derived from (opro_demo, bpo_demo, cai_demo, cai_stages), changed only where the method
needs it (selector, updater, judges), in one scratch runs folder, so the seed model is built
once and every method starts from the same policy. Per run it prints the tinyworld
evaluator's held-out accuracy (`eval/accuracy`, 200 prompts, greedy) for rounds 0..R, the
gain (last round - round 0, in points), the training units of all rounds (pairs, or
selected candidates for top_k / ranked / labels), and wall seconds, then one mean row per
method. The peer every method is read against is `dpo` (the demo) of the same seed,
measured in the same run: the `vs dpo` column is the method's gain minus dpo's.
The load average is printed beside the timings: on a shared machine they swing.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LORA = ("learning_rate=3e-4, batch_size=16, scheduler=\"constant\", warmup_ratio=0.0, lora_r=8, "
        "lora_alpha=16, lora_dropout=0.0, max_steps=30")

# method -> (config, overrides). Every one is configs/demo.toml's run but for the method.
METHODS: dict[str, tuple[str, list[str]]] = {
    "dpo": ("demo.toml", []),
    "dpo-base-ref": ("demo.toml", ["updater.reference=\"base\""]),
    "ipo": ("demo.toml", ["updater.loss=\"ipo\"", "updater.beta=0.5"]),
    "orpo": ("demo.toml", [f"updater={{name=\"orpo\", lam=0.1, {LORA}}}"]),
    "raft": ("demo.toml", ["selector={name=\"top_k\", k=1}", f"updater={{name=\"raft\", {LORA}}}"]),
    "rrhf": ("demo.toml", ["selector={name=\"ranked\"}", f"updater={{name=\"rrhf\", {LORA}}}"]),
    "pro": ("demo.toml", ["selector={name=\"ranked\"}",
                          f"updater={{name=\"pro\", sft_weight=0.5, {LORA}}}"]),
    "kto": ("demo.toml", ["selector={name=\"kto\"}", f"updater={{name=\"kto\", beta=0.1, {LORA}}}"]),
    "opro": ("opro_demo.toml", []),
    "bpo": ("bpo_demo.toml", []),
    "cai": ("cai_demo.toml", []),
    "cai-stages": ("cai_stages.toml", []),
}

SHORT_RECIPE = ["model.build.steps=250"]
QUICK = ["prompts.0.per_round=32", "evaluators.0.heldout=100"]
QUICK_STEPS = 10


def run(runs: Path, method: str, seed: int, rounds: int, recipe: list[str], quick: bool) -> dict:
    config, overrides = METHODS[method]
    if quick:
        steps = ([f"stages.{i}.updater.max_steps={QUICK_STEPS}" for i in (0, 1)]
                 if method == "cai-stages" else [f"updater.max_steps={QUICK_STEPS}"])
        overrides = [*overrides, *QUICK, *steps]
    name = f"{method}-s{seed}"
    cmd = [sys.executable, "-m", "loop", "run", str(ROOT / "configs" / config), "--progress", "off",
           "--set", f"runs_dir={runs}", "--set", f"name={name}", "--set", f"seed={seed}",
           "--set", f"rounds={rounds}"]
    if method == "cai-stages":  # its stages must add up to the rounds: SL first, RL after
        cmd += ["--set", f"stages.1.rounds={rounds - 1}"]
    for o in [*recipe, *overrides]:
        cmd += ["--set", o]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.monotonic() - t0
    out = {"method": method, "seed": seed, "seconds": seconds, "ok": proc.returncode == 0,
           "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else ""}
    db = runs / name / "run.db"
    if not db.exists():
        return out
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        acc = dict(conn.execute("select round, value from metrics where name = 'eval/accuracy'"))
        units = conn.execute("select (select count(*) from pairs where selected = 1) + "
                             "(select count(*) from selected)").fetchone()[0]
    finally:
        conn.close()
    out.update(accuracy=[acc.get(r) for r in range(rounds + 1)], units=units)
    return out


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--recipe", choices=["demo", "short"], default="demo",
                    help="seed model: the demo's (600 steps) or the tests' (250 steps)")
    ap.add_argument("--runs", type=Path, help="runs folder (default: a scratch one)")
    ap.add_argument("--quick", action="store_true",
                    help="32 prompts a round, 100 held-out prompts, 10 optimizer steps")
    args = ap.parse_args()
    if "dpo" not in args.methods:
        args.methods.insert(0, "dpo")  # the peer
    runs = args.runs or Path(tempfile.mkdtemp(prefix="selfloop-methods-")) / "runs"
    recipe = SHORT_RECIPE if args.recipe == "short" else []
    print(f"runs folder: {runs}; recipe: {args.recipe}; rounds: {args.rounds}; "
          f"{'quick (' + ', '.join(QUICK) + f', {QUICK_STEPS} steps); ' if args.quick else ''}"
          f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            r = run(runs, method, seed, args.rounds, recipe, args.quick)
            results.append(r)
            print(f"  {method} seed {seed}: {'ok' if r['ok'] else 'FAILED ' + r['error']} "
                  f"({r['seconds']:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    peer = {r["seed"]: r for r in results if r["method"] == "dpo"}
    head = ["method", "seed", *[f"round {i}" for i in range(args.rounds + 1)], "gain",
            "vs dpo", "pairs/units", "seconds"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join([" --- "] * 2 + [" ---: "] * (len(head) - 2)) + "|")

    def gain(r):
        acc = r.get("accuracy") or []
        return None if not acc or acc[0] is None or acc[-1] is None else acc[-1] - acc[0]

    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        for r in rows:
            g, pg = gain(r), gain(peer.get(r["seed"], {}))
            vs = "-" if g is None or pg is None else f"{100 * (g - pg):+.1f}"
            accs = r.get("accuracy") or [None] * (args.rounds + 1)
            print(f"| {method} | {r['seed']} | " + " | ".join(pct(a) for a in accs)
                  + f" | {'-' if g is None else f'{100 * g:+.1f}'} | {vs} | {r.get('units', '-')} | "
                  f"{r['seconds']:.0f} |")
        gains = [gain(r) for r in rows if gain(r) is not None]
        if len(rows) > 1 and gains:
            print(f"| **{method} mean** | {len(gains)} seeds | " + " | ".join(
                pct(sum(r["accuracy"][i] for r in rows if gain(r) is not None) / len(gains))
                for i in range(args.rounds + 1)) + f" | {100 * sum(gains) / len(gains):+.1f} | | | |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (2 cores shared: seconds are noisy)")


if __name__ == "__main__":
    main()
