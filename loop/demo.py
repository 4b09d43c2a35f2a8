"""``selfloop demo``: the embedded default, end to end, on CPU and offline.

    selfloop demo            # or: make demo

Builds (or reuses, from runs/.cache/) the tiny model of plugins/tinyworld, runs
self-rewarding rounds with DPO (configs/demo.toml) under the live dashboard, and ends
with one row per round: held-out accuracy (checked by a verifier the loop never sees),
judge agreement with that verifier, pairs, mean DPO reward margin, response length and
seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from loop import __version__
from loop import runner as r
from loop.errors import UserError
from loop.resources import shipped

DEMO_CONFIG = shipped("configs", "demo.toml")


def run_demo(rounds: int = 3, name: str = "demo", overrides: list[str] = (), progress: str = "auto",
             console: Console | None = None) -> list[dict]:
    from loop.cli import execute
    from loop.monitor import open_reader
    from loop.report import report_data, report_table

    console = console or Console(stderr=True)
    if not DEMO_CONFIG.is_file():
        raise UserError(f"{DEMO_CONFIG}: the demo config is missing from this installation")
    overrides = [f"rounds={rounds}", f"name={name}", *overrides]
    config, comps = r.prepare(str(DEMO_CONFIG), overrides)
    run_dir = config.run_dir
    rows: list[dict] = []

    def make_runner(build_progress):
        if (run_dir / r.DB_FILE).is_file() and _status(run_dir) not in ("completed", None):
            console.print(f"[bold]resuming the unfinished demo run in {run_dir}[/]")
            return r.resume(run_dir, build_progress=build_progress)
        # The seed model is built (first time only; cached in runs/.cache) with its
        # progress on the dashboard.
        model_path = r.resolve_model_path(config, comps, progress=build_progress)
        made = r.create_run(config, comps, model_path, __version__, replace=True)
        return r.Runner(made, config, comps, model_path, resumed=False)

    def report(folder):
        store = open_reader(folder)
        try:
            rows.extend(report_data(store))
        finally:
            store.close()
        # A pipe gets 160 columns, as `selfloop report` does (rich's 80 would squeeze it).
        Console(width=None if sys.stdout.isatty() else 160).print(report_table(rows))

    execute(make_runner, progress, report=report)
    return rows


def _status(run_dir: Path) -> str | None:
    from loop.store import Store

    store = Store.open_readonly(run_dir / r.DB_FILE)
    try:
        row = store.run_row()
        return row["status"] if row else None
    finally:
        store.close()
