"""Peak memory of the `dataset` prompt source on a large generated JSONL file, against a
peer measured in the same run: the same file parsed into a Python list (what the reader
did before it went through `datasets`).

    python bench/prompt_memory.py                # a 1 GB file
    python bench/prompt_memory.py --size-gb 0.1  # quicker

Each measurement runs in a fresh process, sampling /proc/self/status every 20 ms:
VmHWM (peak resident set, which counts the memory-mapped Arrow pages the process touched:
page cache, shared and reclaimable) and the peak of RssAnon (memory the process itself
holds). `datasets` converts the file to an Arrow file in its cache once (a temporary
cache here), then memory-maps it; the check of every row runs in batches.

Steps measured for selfloop: (1) the first validation (conversion + the check of every
row), (2) a second process, as `resume` or the run's setup after validation: the cached
Arrow file, checked again, then three rounds of `propose` (64 prompts each, a seeded
permutation of all rows).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("sort the letters write a poem about summarise explain why how many name three list "
         "the reasons for and against in one line please answer briefly").split()


def generate(path: Path, size: int) -> int:
    """JSONL rows of 20-60 words (a prompt and an answer each) until ``size`` bytes."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(1000)]
    rows, written = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size:
            chunk = "".join(f'{{"prompt": "{texts[i % 1000]} #{i}", "answer": "{i % 97}"}}\n'
                            for i in range(rows, rows + 20_000))
            rows += 20_000
            fh.write(chunk)
            written += len(chunk)
    return rows


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(mode: str, path: str) -> None:
    """One measurement; prints a JSON line."""
    peak_anon = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.02)

    base = _status("VmRSS")
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    if mode == "peer":
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        n = len(rows)
    else:
        sys.path.insert(0, str(ROOT))
        from plugins.prompts.dataset import DatasetPrompts

        import loop

        options = DatasetPrompts.Options(path=path, per_round=64)  # validates: reads every row
        n = None
        if mode == "resume":
            source = DatasetPrompts(options, label="dataset")
            source.setup(None)
            n = len(source._data)
            config = type("C", (), {"seed": 0})()
            for r in (1, 2, 3):
                prompts = source.propose(type("Ctx", (), {"round": r, "config": config})())
                assert len(prompts) == 64 and isinstance(prompts[0], loop.Prompt)
    seconds = time.perf_counter() - t0
    stop.set()
    print(json.dumps({"mode": mode, "rows": n, "seconds": round(seconds, 1), "base_rss": base,
                      "peak_rss": _status("VmHWM"), "peak_anon": max(peak_anon[0], _status("RssAnon"))}))


def measure(mode: str, path: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    work = Path(tempfile.mkdtemp(prefix="prompt-memory-"))
    try:
        path = work / "prompts.jsonl"
        t0 = time.perf_counter()
        rows = generate(path, int(args.size_gb * 1e9))
        size = path.stat().st_size
        print(f"generated {path.name}: {size / 1e9:.2f} GB, {rows} rows in "
              f"{time.perf_counter() - t0:.0f} s; load average {os.getloadavg()}")
        env = dict(os.environ, HF_DATASETS_CACHE=str(work / "datasets-cache"))
        results = [measure(m, path, env) for m in ("validate", "resume", "peer")]
        mb = 1 / 2**20
        print(f"{'step':<34}{'seconds':>8}{'peak RSS MiB':>14}{'peak anon MiB':>15}")
        names = {"validate": "selfloop: first validation",
                 "resume": "selfloop: cached + 3 rounds",
                 "peer": "peer: json.loads into a list"}
        for r in results:
            print(f"{names[r['mode']]:<34}{r['seconds']:>8}{r['peak_rss'] * mb:>14.0f}"
                  f"{r['peak_anon'] * mb:>15.0f}")
        ours = max(r["peak_anon"] for r in results if r["mode"] != "peer")
        peer = results[-1]["peak_anon"]
        print(f"peak anonymous memory, peer / selfloop: {peer / ours:.1f}x "
              f"(file {size * mb:.0f} MiB; load average {os.getloadavg()})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
