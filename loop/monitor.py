"""The dashboard: a plugin on the lifecycle hooks, and the same view read from a database.

- ``RichMonitor``: one rich ``Live``: an overall rounds bar, a bar for the current phase
  (done/total, rate, ETA), the per-round metrics grouped by their ``group/`` prefix, and
  recent events.
- ``PlainMonitor``: the same information as log lines (for pipes and CI logs).
- ``watch``: the rich view, redrawn from the run database opened read-only.
- ``status_table``: the tables behind ``selfloop status`` (``report``: loop/report.py).
"""

from __future__ import annotations

import json
import os
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
    ("judge/parse_failure_rate", "parse fail"),
    ("select/examples", "examples"),
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
    note: str | None = None  # set when the stored status is not the truth (a dead writer)

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


# The live layout: a two-line head, the metrics panel, warnings, the last events. Sized to
# the terminal (100x30 shows the head, ~16 metric rows of 5 rounds and 3 events); rows
# that do not fit are counted in the panel's title (`selfloop status RUN --metrics`).
NAME_WIDTH = 34  # longest metric name shown whole
VALUE_WIDTH = 7  # one round's column
MAX_EVENTS = 6


def render(s: Snapshot, now: float | None = None, width: int = 100,
           height: int | None = None) -> Group:
    """The dashboard for one snapshot, fitted to ``width`` x ``height`` (None: no height
    limit). A pure function: tests render it into a string."""
    now = time.time() if now is None else now
    narrow = width < 120
    head = Table.grid(padding=(0, 1))
    head.add_column(width=8, no_wrap=True)
    head.add_column(no_wrap=True)
    head.add_column(no_wrap=True, overflow="ellipsis")
    bar = 16 if narrow else 30
    total_rounds = s.rounds + 1  # round 0 evaluates the starting policy
    if s.status == "building":  # before the run: its model is being built
        head.add_row("run", _bar(0, None, bar),
                     "building the seed model (the first time only: it is cached)")
    else:
        head.add_row(
            "rounds", _bar(s.rounds_done, total_rounds, bar),
            # Plain strings in rich tables are markup: "[completed]" would vanish unescaped.
            escape(f"{s.rounds_done}/{total_rounds} (round 0 = start)  {s.name}  [{s.status}]"),
        )
    if s.phase is not None:
        head.add_row(s.phase, _bar(s.done, s.total, bar), escape(_phase_line(s, now)))
    parts: list = [head]
    used = 2 if s.phase is not None else 1
    trend = trends(s.metrics, KEY_METRICS, fmt=_fmt)  # sparklines of the key metrics
    if trend is not None:
        parts.append(trend)
        chars = sum(len(t.plain) + 3 for t in trend.renderables)
        used += max(1, -(-chars // max(width, 1)))
    warnings = s.warnings()
    warn_panel = None
    if warnings:
        warn_panel = Panel(Text("\n".join(warnings), style="bold yellow", no_wrap=True,
                                overflow="ellipsis"),
                           title="warning", title_align="left", border_style="yellow")
        used += len(warnings) + 2
    events = list(s.events)
    if height is not None:
        # Events give way to metrics on short terminals: at most a sixth of the height.
        events = events[-max(1, min(MAX_EVENTS, height // 6 - 2)):] if events else []
    ev_lines = len(events) + 2 if events else 0
    budget = None if height is None else max(1, height - 1 - used - ev_lines - 3)
    panel = metrics_panel(s.metrics, width, budget, run=s.name)
    if panel is not None:
        parts.append(panel)
    if warn_panel is not None:
        parts.append(warn_panel)
    if events:
        ev = Table.grid()
        ev.add_column(no_wrap=True, overflow="ellipsis")
        for level, message in events:
            style = {"error": "red", "warning": "yellow"}.get(level, "dim")
            ev.add_row(Text(f"{level:7s} {message}", style=style))
        parts.append(Panel(ev, title="events", title_align="left"))
    return Group(*parts)


def _phase_line(s: Snapshot, now: float) -> str:
    elapsed = now - s.phase_started if s.phase_started else 0.0
    rate = s.done / elapsed if elapsed > 0 and s.done else None
    eta = (s.total - s.done) / rate if rate and s.total else None
    count = f"{s.done}/{s.total}" if s.total else f"{s.done}"
    where = f"seed model step {count}" if s.round is None else f"round {s.round}  {count}"
    extra = "  ".join(f"{k}={_fmt(v)}" for k, v in list(s.phase_metrics.items())[:3])
    return (f"{where}  {rate or 0:.1f}/s  elapsed {_duration(elapsed)}"
            f"  eta {_duration(eta)}  {extra}").rstrip()


class Dashboard:
    """``render`` at the console's current size (what the live display draws)."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def __rich_console__(self, console, options):
        yield render(self.snapshot, width=options.max_width, height=console.size.height)


def shown_metrics(metrics: dict) -> dict[str, list[str]]:
    """Metric names by ``group/`` prefix, in dashboard order (GROUP_ORDER, then A-Z).

    With a single judge, its ``judge/<label>/x`` rows are left out where the runner's
    pooled ``judge/x`` holds the same figure.
    """
    names = {name for per_round in metrics.values() for name in per_round}
    labels = {n.split("/")[1] for n in names if n.startswith("judge/") and n.count("/") == 2}
    if len(labels) == 1:
        (label,) = labels
        prefix = f"judge/{label}/"
        names = {n for n in names
                 if not (n.startswith(prefix) and "judge/" + n[len(prefix):] in names)}
    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=_priority):
        groups.setdefault(name.partition("/")[0], []).append(name)
    order = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER)
    return {g: groups[g] for g in order}


def _priority(name: str) -> tuple:
    """Within a group: key metrics, then pooled figures, then per-component ones; A-Z."""
    key = [k for k, _ in KEY_METRICS]
    return (key.index(name) if name in key else len(key), name.count("/"), name)


def _fit(groups: dict[str, list[str]], rows: int) -> dict[str, list[str]]:
    """At most ``rows`` names, shared fairly: every group gets one before any gets two."""
    if sum(len(v) for v in groups.values()) <= rows:
        return groups
    taken = {g: 0 for g in groups}
    left = rows
    while left > 0:
        grew = False
        for g, names in groups.items():
            if left > 0 and taken[g] < len(names):
                taken[g] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return {g: names[: taken[g]] for g, names in groups.items() if taken[g]}


def metrics_panel(metrics: dict, width: int = 100, rows: int | None = None,
                  run: str = "RUN") -> Panel | None:
    """The metrics of the last rounds that fit ``width`` and ``rows`` table rows."""
    groups = shown_metrics(metrics)
    if not groups:
        return None
    total = sum(len(v) for v in groups.values())
    names = [n for v in groups.values() for n in v]
    name_w = min(NAME_WIDTH, max(len("metric"), *(len(n) for n in names)))
    inner = width - 4  # the panel's border and padding
    n_rounds = max(1, min(5, len(metrics), (inner - name_w) // (VALUE_WIDTH + 1)))
    table_w = name_w + n_rounds * (VALUE_WIDTH + 1)
    crowded = total > rows if rows is not None else total > 12
    columns = 2 if crowded and inner >= 2 * table_w + 4 else 1
    if rows is None:
        fitted = groups
    else:
        fitted = _fit(groups, rows * columns)
    shown = sum(len(v) for v in fitted.values())
    rounds = sorted(metrics)[-n_rounds:]
    flat = [n for v in fitted.values() for n in v]
    per = -(-len(flat) // columns)
    tables = [_metric_table(flat[i * per:(i + 1) * per], metrics, rounds, name_w)
              for i in range(columns) if flat[i * per:(i + 1) * per]]
    title = "metrics by round"
    if shown < total:
        title += f" ({shown} of {total}; all: selfloop status {run} --metrics)"
    body = tables[0] if len(tables) == 1 else Columns(tables, padding=(0, 4))
    return Panel(body, title=escape(title), title_align="left")


def _metric_table(names: list[str], metrics: dict, rounds: list[int], name_w: int) -> Table:
    t = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    t.add_column("metric", style="bold", no_wrap=True, overflow="ellipsis", max_width=name_w)
    for r in rounds:
        t.add_column(f"r{r}", justify="right", no_wrap=True, min_width=VALUE_WIDTH - 2)
    for name in names:
        t.add_row(name, *(_fmt(metrics[r].get(name)) for r in rounds))
    return t


class RichMonitor:
    """The live dashboard, registered as a plugin for the length of a run.

    The display starts on the first thing to show: the seed model's build
    (``build_progress``, before the run exists) or the run's start.
    """

    live_terminal = True  # it draws on the terminal: stderr goes to the run's log meanwhile

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4):
        self.console = console or Console()
        self.snapshot = Snapshot()
        # stderr is not redirected into the display: loop.terminal sends it to run.log.
        self.live = Live(console=self.console, refresh_per_second=refresh_per_second,
                         get_renderable=lambda: Dashboard(self.snapshot), transient=False,
                         redirect_stderr=False)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.live.start()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        if self._started:
            self._started = False
            self.live.refresh()
            self.live.stop()
        return False

    def note(self, text: str) -> None:
        """A line above the dashboard."""
        self.console.print(escape(text), highlight=False)

    def build_progress(self, done: int, total: int | None = None, **metrics: float) -> None:
        """The seed model's build: training steps done of ``total`` (before the run starts)."""
        s = self.snapshot
        if s.phase != "model":
            s.phase, s.round, s.phase_started, s.status = "model", None, time.time(), "building"
        s.done, s.total, s.phase_metrics = done, total, metrics
        self.start()

    @hookimpl
    def run_start(self, run):
        s = self.snapshot
        s.name, s.rounds, s.status = run.name, run.rounds, "running"
        s.phase = None  # the model's build, if any, is over
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

    live_terminal = False

    def __init__(self, stream=None, every: float = 5.0):
        self._stream = stream
        self.every = every
        self._last = 0.0
        self._build_started: float | None = None

    @property
    def stream(self):
        return self._stream or sys.stderr  # looked up late: loop.terminal may wrap it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _line(self, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        try:
            print(f"{stamp} {text}", file=self.stream, flush=True)
        except BrokenPipeError:  # `selfloop run ... 2>&1 | head`: the reader left
            self._stream = open(os.devnull, "w")

    def note(self, text: str) -> None:
        self._line(text)

    def build_progress(self, done: int, total: int | None = None, **metrics: float) -> None:
        now = time.monotonic()
        if self._build_started is None:
            self._build_started = self._last = now
            self._line(f"building the seed model ({total or '?'} steps; cached afterwards)")
        if now - self._last >= self.every or (total and done >= total):
            self._last = now
            elapsed = now - self._build_started
            eta = (total - done) * elapsed / done if total and done else None
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            self._line(f"seed model step {done}/{total or '?'} {extra} elapsed "
                       f"{_duration(elapsed)} eta {_duration(eta)}")

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


def run_status(store: Store) -> tuple[str, str | None]:
    """The run's status made truthful, and a note when it had to be: a run stored as
    running whose writer holds no lock died without recording its end (SIGKILL, power
    loss, a full disk); readers show it as interrupted (loop/lock.py, ``writer_alive``)."""
    from loop.lock import read_holder, writer_alive

    stored = (store.run_row() or {}).get("status", "?")
    run_dir = Path(store.path).parent
    if stored != "running" or writer_alive(run_dir):
        return stored, None
    pid = read_holder(run_dir).get("pid", "?")
    return "interrupted", (f"{run_dir}: its writer (pid {pid}) is gone without recording its "
                           f"end; `selfloop resume {run_dir}` continues it")


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def snapshot_from_store(store: Store) -> Snapshot:
    run = store.run_row() or {}
    s = Snapshot(name=run.get("name", ""), rounds=run.get("rounds", 0), status=run.get("status", "?"))
    s.status, s.note = run_status(store)
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


def watch(run_dir: str | Path, interval: float = 1.0, once: bool = False,
          console: Console | None = None) -> Snapshot | None:
    """Redraw until the run is no longer running (or its writer died); the last snapshot."""
    console = console or Console()
    store = open_reader(run_dir)
    snap = None
    try:
        if once:  # everything, at the console's width (a snapshot for a log)
            snap = snapshot_from_store(store)
            console.print(render(snap, width=console.width))
        else:
            with Live(console=console, refresh_per_second=4) as live:
                while True:
                    snap = snapshot_from_store(store)
                    live.update(Dashboard(snap))  # fitted to the terminal, as during the run
                    if snap.status != "running":
                        break
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    if snap is not None and snap.note:
        console.print(escape(snap.note))
    return snap


def status_data(store: Store) -> dict:
    run = store.run_row() or {}
    phases: dict[int, dict[str, dict]] = {}
    for p in store.phases():
        phases.setdefault(p["round"], {})[p["phase"]] = {
            "status": p["status"], "seconds": p["seconds"], "attempt": p["attempt"],
            "done": p["done"], "total": p["total"], "error": p["error"],
        }
    status, note = run_status(store)
    if note:  # the dead writer's running phase did not finish either
        for by_phase in phases.values():
            for ph in by_phase.values():
                if ph["status"] == "running":
                    ph["status"] = "interrupted"
    rounds = {r["round"]: r for r in store.rounds()}
    metrics = store.metrics()
    return {
        "name": run.get("name"),
        "status": status,
        "stored_status": run.get("status"),
        "note": note,
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
    if data.get("note"):
        t.caption = escape(data["note"])
    m = Table(title="key metrics", title_justify="left")
    m.add_column("round", justify="right")
    for _, label in KEY_METRICS:
        m.add_column(label, justify="right")
    for row in data["per_round"]:
        if row["metrics"]:
            m.add_row(str(row["round"]), *(_fmt(row["metrics"].get(k)) for k, _ in KEY_METRICS))
    return Group(t, m)


def all_metrics_table(data: dict, max_rounds: int = 10) -> Table:
    """``status --metrics``: every metric (one row each, by ``group/`` prefix) of the last
    ``max_rounds`` rounds; ``status --json`` has every round."""
    per = {row["round"]: row["metrics"] for row in data["per_round"] if row["metrics"]}
    rounds = sorted(per)[-max_rounds:]
    names = sorted({n for r in rounds for n in per[r]})
    groups = [g for g in GROUP_ORDER if any(n.startswith(g + "/") for n in names)]
    groups += sorted({n.partition("/")[0] for n in names} - set(groups))
    t = Table(title=escape(f"{data['name']} [{data['status']}]: all metrics"), title_justify="left")
    t.add_column("metric", no_wrap=True)
    for r in rounds:
        t.add_column(f"r{r}", justify="right")
    for g in groups:
        for name in (n for n in names if n.partition("/")[0] == g):
            t.add_row(name, *(_fmt(per[r].get(name)) for r in rounds))
        t.add_section()
    if len(per) > len(rounds):
        t.caption = f"the last {len(rounds)} of {len(per)} rounds; --json has them all"
    return t
