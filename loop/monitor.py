"""The dashboard: a plugin on the lifecycle hooks, and the same view read from a database.

- ``RichMonitor``: one rich ``Live``: an overall rounds bar, a bar for the current phase
  (done/total, rate, ETA), the per-round metrics grouped by their ``group/`` prefix, and
  recent events.
- ``PlainMonitor``: the same information as log lines (for pipes and CI logs).
- ``watch``: the rich view, redrawn from the run database opened read-only.
- ``status_table`` / ``report_table``: the tables behind ``selfloop status`` / ``report``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from loop.hookspecs import hookimpl
from loop.judge_quality import length_bias_warnings
from loop.sparklines import trends
from loop.store import Store

PHASE_ORDER = ("propose", "optimise", "generate", "judge", "select", "update", "evaluate")
# Metric groups shown on the dashboard, in this order (others follow alphabetically).
GROUP_ORDER = ("eval", "judge", "select", "rewards", "train", "generate", "prompts")
KEY_METRICS = (
    ("eval/accuracy", "accuracy"),
    ("judge/verifier_agreement", "judge≈verifier"),
    ("select/pairs", "pairs"),
    ("rewards/margin", "margin"),
    ("generate/mean_tokens", "length"),
)


@dataclass
class Snapshot:
    """Everything the dashboard draws; filled by hooks (live) or from a database (watch)."""

    name: str = ""
    rounds: int = 0
    status: str = "running"
    round: int | None = None
    phase: str | None = None
    done: int = 0
    total: int | None = None
    phase_started: float | None = None  # epoch seconds
    rounds_done: int = 0
    phase_metrics: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # {round: {name: value}}
    events: deque = field(default_factory=lambda: deque(maxlen=6))
    # Length-bias warning thresholds ([judge_quality] in the run config).
    length_bias_threshold: float = 0.5
    length_ratio_threshold: float = 1.5

    def warnings(self) -> list[str]:
        """Length-bias warnings for the latest round with metrics."""
        if not self.metrics:
            return []
        latest = max(self.metrics)
        return [f"round {latest} {w}" for w in length_bias_warnings(
            self.metrics[latest], self.length_bias_threshold, self.length_ratio_threshold)]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000 or v == int(v):
            return f"{v:.0f}"
        return f"{v:.3f}"
    return str(v)


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _bar(done: float, total: float | None, width: int = 30) -> Text:
    if not total:
        return Text("·" * width, style="dim")
    frac = max(0.0, min(1.0, done / total))
    full = int(frac * width)
    return Text("━" * full, style="green") + Text("━" * (width - full), style="grey35")


def render(s: Snapshot, now: float | None = None) -> Group:
    """The dashboard for one snapshot (a pure function: tests render it into a string)."""
    now = time.time() if now is None else now
    parts = []
    head = Table.grid(padding=(0, 1))
    head.add_column(width=10)
    head.add_column()
    head.add_column()
    total_rounds = s.rounds + 1  # round 0 evaluates the starting policy
    head.add_row(
        "rounds", _bar(s.rounds_done, total_rounds),
        # Plain strings in rich tables are markup: "[completed]" would vanish unescaped.
        escape(f"{s.rounds_done}/{total_rounds} (round 0 = start)  {s.name}  [{s.status}]"),
    )
    if s.phase is not None:
        elapsed = now - s.phase_started if s.phase_started else 0.0
        rate = s.done / elapsed if elapsed > 0 and s.done else None
        eta = (s.total - s.done) / rate if rate and s.total else None
        count = f"{s.done}/{s.total}" if s.total else f"{s.done}"
        extra = "  ".join(f"{k}={_fmt(v)}" for k, v in list(s.phase_metrics.items())[:3])
        head.add_row(
            s.phase, _bar(s.done, s.total),
            escape(f"round {s.round}  {count}  {rate or 0:.1f}/s  elapsed {_duration(elapsed)}"
                   f"  eta {_duration(eta)}  {extra}"),
        )
    parts.append(head)
    trend = trends(s.metrics, KEY_METRICS, fmt=_fmt)
    if trend is not None:
        parts.append(trend)
    recent = {r: s.metrics[r] for r in sorted(s.metrics)[-6:]}
    tables = metric_tables(recent)
    if tables:
        parts.append(Panel(Columns(tables, padding=(0, 4)), title="metrics by round",
                           title_align="left"))
    warnings = s.warnings()
    if warnings:
        parts.append(Panel(Text("\n".join(warnings), style="bold yellow"), title="warning",
                           title_align="left", border_style="yellow"))
    if s.events:
        ev = Text()
        for level, message in s.events:
            style = {"error": "red", "warning": "yellow"}.get(level, "dim")
            ev.append(f"{level:7s} {message}\n", style=style)
        ev.rstrip()
        parts.append(Panel(ev, title="events", title_align="left"))
    return Group(*parts)


def metric_tables(metrics: dict, max_rounds: int = 5) -> list[Table]:
    """The metrics of the last rounds: one row per metric, sections by ``group/`` prefix."""
    rounds = sorted(metrics)[-max_rounds:]
    groups: dict[str, set[str]] = {}
    for r in rounds:
        for name in metrics[r]:
            groups.setdefault(name.partition("/")[0], set()).add(name)
    if not groups:
        return []
    order = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER)
    left = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    left.add_column("metric", style="bold")
    for r in rounds:
        left.add_column(f"r{r}", justify="right")
    halves = [left]
    if sum(len(groups[g]) for g in order) > 12:
        right = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
        right.add_column("metric", style="bold")
        for r in rounds:
            right.add_column(f"r{r}", justify="right")
        halves.append(right)
    # Fill the first table with the first half of the groups, the second with the rest.
    total = sum(len(groups[g]) for g in order)
    filled = 0
    for group in order:
        table = halves[0] if filled < total / len(halves) or len(halves) == 1 else halves[1]
        for name in sorted(groups[group]):
            table.add_row(name, *(_fmt(metrics[r].get(name)) for r in rounds))
            filled += 1
        table.add_section()
    return halves


class RichMonitor:
    """The live dashboard, registered as a plugin for the length of a run."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4):
        self.console = console or Console()
        self.snapshot = Snapshot()
        self.live = Live(console=self.console, refresh_per_second=refresh_per_second,
                         get_renderable=lambda: render(self.snapshot), transient=False)

    def __enter__(self):
        self.live.start()
        return self

    def __exit__(self, *exc):
        self.live.refresh()
        self.live.stop()
        return False

    @hookimpl
    def run_start(self, run):
        s = self.snapshot
        s.name, s.rounds, s.status = run.name, run.rounds, "running"
        quality = run.config.judge_quality
        s.length_bias_threshold = quality.length_bias_threshold
        s.length_ratio_threshold = quality.length_ratio_threshold
        s.metrics = run.store.metrics()
        s.rounds_done = sum(1 for r in run.store.rounds() if r["status"] == "done")

    @hookimpl
    def round_start(self, run, round):
        self.snapshot.round = round

    @hookimpl
    def phase_start(self, run, round, phase):
        s = self.snapshot
        s.round, s.phase, s.done, s.total = round, phase, 0, None
        s.phase_started, s.phase_metrics = time.time(), {}

    @hookimpl
    def progress(self, run, round, phase, done, total, metrics):
        s = self.snapshot
        s.done, s.total = done, total
        if metrics:
            s.phase_metrics = metrics

    @hookimpl
    def phase_end(self, run, round, phase, status, seconds):
        s = self.snapshot
        s.phase = None
        s.metrics = run.store.metrics()

    @hookimpl
    def round_end(self, run, round, metrics):
        self.snapshot.rounds_done += 1
        self.snapshot.metrics = run.store.metrics()

    @hookimpl
    def event(self, run, round, phase, level, message, data):
        self.snapshot.events.append((level, message))

    @hookimpl
    def run_end(self, run, status):
        self.snapshot.status = status


class PlainMonitor:
    """Log lines: phase starts and ends, progress every few seconds, round metrics."""

    def __init__(self, stream=None, every: float = 5.0):
        self.stream = stream or sys.stderr
        self.every = every
        self._last = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _line(self, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        print(f"{stamp} {text}", file=self.stream, flush=True)

    @hookimpl
    def run_start(self, run):
        verb = "resuming" if run.resumed else "starting"
        self._line(f"{verb} run {run.name} ({run.rounds} rounds) in {run.run_dir}")

    @hookimpl
    def phase_start(self, run, round, phase):
        self._line(f"round {round} {phase} ...")
        self._last = time.monotonic()

    @hookimpl
    def progress(self, run, round, phase, done, total, metrics):
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            self._line(f"round {round} {phase} {done}/{total or '?'} {extra}".rstrip())

    @hookimpl
    def phase_end(self, run, round, phase, status, seconds):
        self._line(f"round {round} {phase} {status} in {seconds:.1f}s")

    @hookimpl
    def round_end(self, run, round, metrics):
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()))
        self._line(f"round {round} done: {shown}")
        quality = run.config.judge_quality
        for warning in length_bias_warnings(metrics, quality.length_bias_threshold,
                                            quality.length_ratio_threshold):
            self._line(f"warning: round {round} {warning}")

    @hookimpl
    def event(self, run, round, phase, level, message, data):
        if level != "info" or round is None:
            self._line(f"{level}: {message}")

    @hookimpl
    def run_end(self, run, status):
        self._line(f"run {run.name} {status}")


def make_monitor(progress: str):
    if progress == "auto":
        progress = "rich" if sys.stdout.isatty() else "plain"
    if progress == "rich":
        return RichMonitor()
    if progress == "plain":
        return PlainMonitor()
    return None


# ---------------------------------------------------------------------------
# Reading a run from its database (status, watch, report)
# ---------------------------------------------------------------------------


def open_reader(run_dir: str | Path) -> Store:
    from loop.errors import UserError

    path = Path(run_dir) / "run.db"
    if not path.is_file():
        raise UserError(f"{run_dir}: no run.db here; give a run folder such as runs/NAME")
    return Store.open_readonly(path)


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def snapshot_from_store(store: Store) -> Snapshot:
    run = store.run_row() or {}
    s = Snapshot(name=run.get("name", ""), rounds=run.get("rounds", 0), status=run.get("status", "?"))
    try:
        quality = json.loads(run.get("config") or "{}").get("judge_quality") or {}
    except ValueError:
        quality = {}
    s.length_bias_threshold = quality.get("length_bias_threshold", s.length_bias_threshold)
    s.length_ratio_threshold = quality.get("length_ratio_threshold", s.length_ratio_threshold)
    s.metrics = store.metrics()
    s.rounds_done = sum(1 for r in store.rounds() if r["status"] == "done")
    running = store.rows("select * from phases where status = 'running' order by started_at desc limit 1")
    if running and s.status == "running":
        p = running[0]
        s.round, s.phase, s.done, s.total = p["round"], p["phase"], p["done"] or 0, p["total"]
        s.phase_started = _epoch(p["started_at"])
    for e in store.events(6):
        s.events.append((e["level"], e["message"]))
    return s


def watch(run_dir: str | Path, interval: float = 1.0, once: bool = False, console: Console | None = None):
    console = console or Console()
    store = open_reader(run_dir)
    try:
        if once:
            console.print(render(snapshot_from_store(store)))
            return
        with Live(console=console, refresh_per_second=4) as live:
            while True:
                snap = snapshot_from_store(store)
                live.update(render(snap))
                if snap.status != "running":
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


def status_data(store: Store) -> dict:
    run = store.run_row() or {}
    phases: dict[int, dict[str, dict]] = {}
    for p in store.phases():
        phases.setdefault(p["round"], {})[p["phase"]] = {
            "status": p["status"], "seconds": p["seconds"], "attempt": p["attempt"],
            "done": p["done"], "total": p["total"], "error": p["error"],
        }
    rounds = {r["round"]: r for r in store.rounds()}
    metrics = store.metrics()
    return {
        "name": run.get("name"),
        "status": run.get("status"),
        "rounds": run.get("rounds"),
        "per_round": [
            {
                "round": r,
                "status": rounds.get(r, {}).get("status", "pending"),
                "seconds": rounds.get(r, {}).get("seconds"),
                "policy": rounds.get(r, {}).get("policy"),
                "phases": phases.get(r, {}),
                "metrics": metrics.get(r, {}),
            }
            for r in range(0, (run.get("rounds") or 0) + 1)
        ],
    }


PHASE_SHORT = {"propose": "prop", "optimise": "opt", "generate": "gen", "judge": "judge",
               "select": "sel", "update": "upd", "evaluate": "eval"}


def status_table(data: dict) -> Group:
    """Two tables: rounds x phases (durations, progress, failures), then key metrics."""
    t = Table(title=escape(f"{data['name']} [{data['status']}]"), title_justify="left")
    t.add_column("round", justify="right")
    for p in PHASE_ORDER:
        t.add_column(PHASE_SHORT[p], justify="right")
    t.add_column("total", justify="right")
    for row in data["per_round"]:
        cells = []
        for p in PHASE_ORDER:
            ph = row["phases"].get(p)
            if ph is None:
                cells.append(Text("·", style="dim"))
            elif ph["status"] == "done":
                cells.append(Text(f"{ph['seconds']:.1f}s", style="green"))
            elif ph["status"] == "running":
                cells.append(Text(f"{ph['done'] or 0}/{ph['total'] or '?'}", style="cyan"))
            else:
                cells.append(Text(ph["status"], style="red" if ph["status"] == "failed" else "yellow"))
        cells.append(_duration(row["seconds"]))
        t.add_row(str(row["round"]), *cells)
    failed = [
        (row["round"], p, ph["error"]) for row in data["per_round"]
        for p, ph in row["phases"].items() if ph["status"] == "failed"
    ]
    if failed:
        r, p, err = failed[-1]
        t.caption = escape(f"round {r} {p} failed: {err}")
    m = Table(title="key metrics", title_justify="left")
    m.add_column("round", justify="right")
    for _, label in KEY_METRICS:
        m.add_column(label, justify="right")
    for row in data["per_round"]:
        if row["metrics"]:
            m.add_row(str(row["round"]), *(_fmt(row["metrics"].get(k)) for k, _ in KEY_METRICS))
    return Group(t, m)


def report_data(store: Store) -> list[dict]:
    metrics = store.metrics()
    rounds = {r["round"]: r for r in store.rounds()}
    out = []
    for r in sorted(metrics):
        m = metrics[r]
        out.append({
            "round": r,
            "accuracy": m.get("eval/accuracy"),
            "judge_agreement": m.get("judge/verifier_agreement"),
            "pairs": m.get("select/pairs"),
            "reward_margin": m.get("rewards/margin"),
            "mean_length": m.get("eval/mean_length", m.get("generate/mean_tokens")),
            "seconds": rounds.get(r, {}).get("seconds"),
        })
    return out


def report_table(rows: list[dict]) -> Table:
    t = Table(title="selfloop report", title_justify="left")
    for col in ("round", "held-out accuracy", "judge agreement", "pairs", "DPO margin",
                "mean length", "seconds"):
        t.add_column(col, justify="right")
    for row in rows:
        acc = row["accuracy"]
        t.add_row(
            str(row["round"]),
            f"{acc * 100:.1f}%" if acc is not None else "-",
            f"{row['judge_agreement'] * 100:.1f}%" if row["judge_agreement"] is not None else "-",
            _fmt(row["pairs"]),
            _fmt(row["reward_margin"]),
            _fmt(row["mean_length"]),
            _fmt(row["seconds"]),
        )
    return t
