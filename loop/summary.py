"""What ``run`` and ``resume`` end with: how far the run got, its key metrics from the
first round to the last, where its files are, and the command to type next.

    demo completed: 3 of 3 rounds in 1:14 (round 0 measured the starting policy)
      eval/accuracy             0.435 -> 0.970  (+0.535)
      ...
      run folder  runs/demo    run.db  adapters/round-3  run.log
      next        selfloop report runs/demo
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text

from loop.monitor import KEY_METRICS, _duration, _fmt, open_reader

MAX_METRICS = 6


def summary_data(run_dir: str | Path) -> dict:
    """The summary's facts, read from the run's database (read-only)."""
    run_dir = Path(run_dir)
    store = open_reader(run_dir)
    try:
        run = store.run_row() or {}
        rounds = store.rounds()
        metrics = store.metrics()
        failed = store.rows("select round, phase, error from phases where status = 'failed' "
                            "order by ended_at desc limit 1")
    finally:
        store.close()
    done = [r for r in rounds if r["status"] == "done"]
    adapter = next((r["adapter"] for r in sorted(done, key=lambda r: r["round"], reverse=True)
                    if r["adapter"]), None)
    return {
        "name": run.get("name"),
        "status": run.get("status"),
        "rounds": run.get("rounds") or 0,
        "rounds_done": sum(1 for r in done if r["round"] > 0),
        "seconds": sum(r["seconds"] or 0 for r in done),
        "metrics": _changes(metrics),
        "adapter": adapter,
        "failed": failed[0] if failed else None,
        "run_dir": str(run_dir),
        "files": [f for f in ("run.db", "run.log", "vllm.log") if (run_dir / f).is_file()],
    }


def _changes(metrics: dict[int, dict[str, float]]) -> list[tuple[str, float, float, int, int]]:
    """(name, first value, last value, first round, last round) for the key metrics."""
    names = [k for k, _ in KEY_METRICS]
    names += sorted({n for m in metrics.values() for n in m if n.startswith("eval/")} - set(names))
    out = []
    for name in names:
        seen = [(r, m[name]) for r, m in sorted(metrics.items()) if name in m]
        if seen:
            (r0, v0), (r1, v1) = seen[0], seen[-1]
            out.append((name, v0, v1, r0, r1))
    return out[:MAX_METRICS]


def next_commands(data: dict) -> list[str]:
    run = data["run_dir"]
    if data["status"] != "completed":
        return [f"selfloop resume {run}", f"selfloop status {run}"]
    return [f"selfloop report {run}", f"selfloop status {run} --metrics",
            f"selfloop export {run} -o pairs.jsonl"]


def summary(data: dict) -> list[Text]:
    """The summary's lines. Print them unwrapped (``soft_wrap=True``): commands and paths
    must stay whole to be copied."""
    status = data["status"]
    style = {"completed": "bold green", "failed": "bold red"}.get(status, "bold yellow")
    head = Text(f"{data['name']} {status}", style=style)
    head.append(f": {data['rounds_done']} of {data['rounds']} rounds in "
                f"{_duration(data['seconds'])} (round 0 measured the starting policy)")
    rows: list[tuple[str, Text]] = []
    if data["failed"]:
        f = data["failed"]
        rows.append((f"round {f['round']} {f['phase']}", Text(str(f["error"] or "failed"),
                                                              style="red")))
    for name, v0, v1, r0, r1 in data["metrics"]:
        if r1 > r0:
            delta = v1 - v0
            change = (f"{_fmt(v0)} -> {_fmt(v1)}  ({'+' if delta >= 0 else ''}{_fmt(delta)}, "
                      f"round {r0} to {r1})")
        else:
            change = f"{_fmt(v1)}  (round {r1})"
        rows.append((name, Text(change)))
    files = [data["run_dir"], *data["files"]] + ([data["adapter"]] if data["adapter"] else [])
    rows.append(("files", Text("  ".join(files))))
    for i, command in enumerate(next_commands(data)):
        rows.append(("next" if i == 0 else "", Text(command, style="bold")))
    width = max(len(label) for label, _ in rows) + 2
    return [head] + [Text(f"  {label:<{width}}") + value for label, value in rows]
