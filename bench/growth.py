"""Does a round get slower as the run grows? A 20-round model-free run, timed per round.

    python bench/growth.py                       # 20 rounds, 96 prompts x 4 answers
    python bench/growth.py --rounds 8 --per-round 32

Model-free, so what is timed is the loop itself: the store (phase commits, reads, the
indexes), the runner, the real ``pairs`` selector and the real ``self_instruct`` prompt
source with its de-duplication index. The components come from the tests' fake plugin
(tests/plugins/fake.py: prompts, judge, updater, evaluator) plus a generator defined here
that writes varied sentences, so self_instruct keeps and stores new prompts every round.
Each phase is timed in-process from its start to its commit's end.

Printed: per round the wall seconds of each phase and the total; then round 20's over
round 2's (and, less noisy, the median of the last three rounds over that of rounds 2-4),
for the round and for each phase, of wall time and of the process's CPU time (which a busy
machine distorts less); 1.0 means no growth. The load average too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import loop
from loop import plugins
from loop import runner as runner_module
from loop.components import Completion

PHASES = runner_module.PHASES
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "vo", "ze") for b in "aeioubdgk"]


class WordyGenerator(loop.Generator):
    """Random sentences over a 72-word vocabulary (plus yes/no for the fake judge), seeded
    by the request, so the run is the same every time and new prompts are mostly new."""

    name = "bench_wordy"

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        out = []
        for chat in chats:
            key = f"{sampling.seed}:{chat[-1]['content']}:{adapter}"
            rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
            samples = []
            for _ in range(sampling.n):
                words = [rng.choice(WORDS + ["yes", "no"]) for _ in range(rng.randint(4, 14))]
                samples.append(Completion(text=" ".join(words), num_tokens=len(words),
                                          finish_reason="stop", logprob_sum=-float(len(words))))
            out.append(samples)
        return out


class _Plugin:
    @loop.hookimpl
    def register_generators(self, register):
        register(WordyGenerator)


def config_text(runs: Path, rounds: int, per_round: int, n: int, self_instruct: int) -> str:
    fake = ROOT / "tests" / "plugins" / "fake.py"
    return f"""
name = "growth"
rounds = {rounds}
seed = 7
runs_dir = "{runs}"
plugins = ["{fake}"]

[model]
build = {{ name = "fake" }}

[generator]
name = "bench_wordy"

[generate]
n = {n}

[[prompts]]
name = "fake"
per_round = {per_round}

[[prompts]]
name = "self_instruct"
per_round = {self_instruct}
examples = 4

[[judges]]
name = "fake"

[selector]
name = "pairs"

[updater]
name = "fake"

[[evaluators]]
name = "fake"
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=96, help="the fake source's prompts per round")
    ap.add_argument("--n", type=int, default=4, help="answers per prompt")
    ap.add_argument("--self-instruct", type=int, default=16, help="self_instruct's requests per round")
    args = ap.parse_args(argv)
    if args.rounds < 4:
        ap.error("--rounds must be at least 4 (round 2 against the last rounds)")

    spent: dict[int, dict[str, float]] = defaultdict(dict)  # wall seconds
    cpu_spent: dict[int, dict[str, float]] = defaultdict(dict)  # this process's CPU seconds
    original = runner_module.Runner._phase

    def timed_phase(self, r, phase, round_t0):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return original(self, r, phase, round_t0)
        finally:
            spent[r][phase] = time.perf_counter() - t0
            cpu_spent[r][phase] = time.process_time() - c0

    runner_module.Runner._phase = timed_phase
    plugin = _Plugin()
    plugins.register(plugin, name="bench-growth")
    from click.testing import CliRunner

    from loop.cli import cli

    cpu0, wall0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "growth.toml"
        cfg.write_text(config_text(Path(tmp) / "runs", args.rounds, args.per_round, args.n,
                                   args.self_instruct))
        res = CliRunner().invoke(cli, ["run", str(cfg), "--progress", "off"], catch_exceptions=False)
        if res.exit_code != 0:
            print(res.output[-3000:], file=sys.stderr)
            return 1
        from loop.store import Store

        store = Store.open_readonly(Path(tmp) / "runs" / "growth" / "run.db")
        counts = store.rows("select (select count(*) from prompts) as prompts, "
                            "(select count(*) from candidates) as candidates, "
                            "(select count(*) from judgments) as judgments, "
                            "(select count(*) from prompt_ngrams) as ngrams")[0]
        kept = store.rows("select round, count(*) as k from prompts where source = 'self_instruct' "
                          "group by round order by round")
        store.close()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    plugins.unregister(plugin)
    runner_module.Runner._phase = original

    rounds = list(range(1, args.rounds + 1))
    total = {r: sum(spent[r].values()) for r in rounds}
    print(f"{args.rounds} rounds, {args.per_round} prompts + {args.self_instruct} self_instruct "
          f"requests x {args.n} answers; stored at the end: {counts}")
    print("self_instruct kept per round:", [x["k"] for x in kept])
    print("round  " + "  ".join(f"{p[:8]:>8s}" for p in PHASES) + "     total")
    for r in rounds:
        print(f"{r:5d}  " + "  ".join(f"{spent[r].get(p, 0):8.4f}" for p in PHASES) + f"  {total[r]:8.4f}")
    last = rounds[-3:]

    def ratios(get) -> str:
        first = get(2)
        plain = get(rounds[-1]) / first if first > 0 else float("nan")
        early = statistics.median(get(r) for r in (2, 3, 4))
        late = statistics.median(get(r) for r in last)
        return f"{plain:6.2f}x   median {late / early if early > 0 else float('nan'):6.2f}x"

    cpu_total = {r: sum(cpu_spent[r].values()) for r in rounds}
    print(f"round {rounds[-1]} / round 2 (and median of rounds {last[0]}-{last[-1]} / of rounds 2-4), "
          "of wall and of CPU seconds:")
    print(f"  {'round':10s} wall {ratios(lambda r: total[r])}   cpu {ratios(lambda r: cpu_total[r])}")
    for p in PHASES:
        print(f"  {p:10s} wall {ratios(lambda r, p=p: spent[r].get(p, 0.0))}   "
              f"cpu {ratios(lambda r, p=p: cpu_spent[r].get(p, 0.0))}")
    print(f"wall {wall:.1f} s  cpu {cpu:.1f} s  loadavg: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
