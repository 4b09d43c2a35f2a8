"""The ``selfloop`` command line.

    selfloop run configs/demo.toml --set rounds=2
    selfloop resume runs/demo
    selfloop status runs/demo
    selfloop watch runs/demo
    selfloop demo
    selfloop plugins --json

User errors (bad config, bad path, unknown plugin) print one line and exit with code 2;
an interrupted run exits with 130 after saying how to resume it.
"""

from __future__ import annotations

import json
import sys

import click

from loop import __version__
from loop.errors import SelfloopError

PROGRESS_CHOICE = click.Choice(["auto", "rich", "plain", "off"])


def _fail(e: SelfloopError) -> None:
    click.echo(f"Error: {e}", err=True)
    sys.exit(e.exit_code)


class Group(click.Group):
    """Turns selfloop's own errors into one line and the right exit code.

    Commands from plugins (the ``register_commands`` hook) are added the first time a
    command name is not a built-in one, or when the help lists every command, so that
    ``status`` and ``watch`` start without importing torch.
    """

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        type(self)._plugins_loaded = True
        from loop import plugins

        try:
            plugins.get_manager().hook.register_commands(cli=self)
        except SelfloopError as e:
            _fail(e)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None:
            self._load_plugin_commands()
            command = super().get_command(ctx, name)
        return command

    def list_commands(self, ctx):
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SelfloopError as e:
            _fail(e)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="selfloop")
def cli():
    """selfloop: a plugin-based self-improvement loop for language models."""


def _progress_option(f):
    return click.option(
        "--progress", type=PROGRESS_CHOICE, default="auto", show_default=True,
        help="Dashboard: rich (live), plain (log lines), off. auto: rich on a terminal.",
    )(f)


def _plugin_option(f):
    return click.option(
        "--plugin", "plugin_files", multiple=True, type=click.Path(dir_okay=False),
        help="Load a single-file plugin (repeatable).",
    )(f)


def execute(runner, progress: str) -> str:
    """Run with the dashboard attached; returns the run's final status."""
    from loop import plugins
    from loop.monitor import make_monitor

    monitor = make_monitor(progress)
    name = None
    if monitor is not None:
        name = plugins.register(monitor, name="selfloop.monitor")
    try:
        with monitor if monitor is not None else _null():
            return runner.run()
    finally:
        if name is not None:
            plugins.unregister(name=name)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@cli.command()
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config field (repeatable), e.g. --set generate.n=8.")
@_plugin_option
@_progress_option
def run(config, overrides, plugin_files, progress):
    """Start a run from a TOML CONFIG file."""
    from loop import runner as r

    runner = r.start(config, list(overrides), extra_plugins=plugin_files, version=__version__)
    click.echo(f"run folder: {runner.run_dir}", err=True)
    execute(runner, progress)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Change an option for the phases still to run (not name, seed or model).")
@click.option("--redo", metavar="round-N.PHASE", default=None,
              help="Discard that phase of round N and everything after it, and run them again "
                   "(e.g. round-1.update after its adapter was damaged).")
@_plugin_option
@_progress_option
def resume(run_dir, overrides, redo, plugin_files, progress):
    """Continue a stopped or failed run: done phases are skipped, an interrupted one re-runs."""
    from loop import runner as r

    execute(r.resume(run_dir, extra_plugins=plugin_files, overrides=list(overrides), redo=redo),
            progress)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run_dir, as_json):
    """Rounds x phases with durations and key metrics (reads the database read-only)."""
    from loop.monitor import status_data, status_table

    _show(run_dir, status_data, status_table, as_json)


def _show(run_dir, data_fn, table_fn, as_json: bool) -> None:
    """Read a run (read-only) with ``data_fn``; print JSON or ``table_fn``'s table."""
    from loop.integrity import reading
    from loop.monitor import open_reader
    from rich.console import Console

    with reading(run_dir):
        store = open_reader(run_dir)
        try:
            data = data_fn(store)
        finally:
            store.close()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        Console().print(table_fn(data))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Draw the dashboard once and exit.")
def watch(run_dir, interval, once):
    """The live dashboard of a run, from another terminal (read-only)."""
    from loop.monitor import watch as do_watch

    do_watch(run_dir, interval=interval, once=once)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report(run_dir, as_json):
    """One row per round: accuracy, judge agreement, pairs, reward margin, length, seconds."""
    from loop.monitor import report_data, report_table

    _show(run_dir, report_data, report_table, as_json)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--round", "round_", type=int, default=None, help="Only this round.")
@click.option("-o", "--output", default="-", show_default=True,
              help="Output file (JSONL); never inside a run folder.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def export(run_dir, round_, output, force):
    """Write the selected preference pairs as JSONL (prompt, chosen, rejected, scores)."""
    from loop.output import open_output

    # Checked before the database is read (never inside a run folder, never over a file
    # without --force), written to a temp file that is renamed into place at the end.
    with open_output(output, force=force, protect=(run_dir,)) as output:
        _export_pairs(run_dir, round_, output)


def _export_pairs(run_dir, round_, output) -> None:
    from loop.integrity import reading
    from loop.monitor import open_reader

    with reading(run_dir):
        _write_pairs(open_reader(run_dir), round_, output)


def _write_pairs(store, round_, output) -> None:
    try:
        sql = (
            "select p.round, pr.text as prompt, ch.text as chosen, rj.text as rejected, "
            "p.chosen_score, p.rejected_score, p.source from pairs p "
            "join prompts pr on pr.id = p.prompt_id join candidates ch on ch.id = p.chosen_id "
            "join candidates rj on rj.id = p.rejected_id where p.selected = 1"
        )
        params: list = []
        if round_ is not None:
            sql += " and p.round = ?"
            params.append(round_)
        for row in store.rows(sql + " order by p.id", params):
            output.write(json.dumps(row) + "\n")
    finally:
        store.close()


@cli.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_plugin_option
def plugins_cmd(as_json, plugin_files):
    """List plugins, their hooks and the components they register."""
    from loop import plugins

    for f in plugin_files:
        plugins.load_plugin_file(f)
    cli._load_plugin_commands()
    data = plugins.plugin_hooks()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("plugin", "hooks", "components", title="selfloop plugins")
    for p in data:
        comps = "; ".join(f"{k}: {', '.join(v)}" for k, v in p["components"].items())
        table.add_row(p["name"] + ("" if p["builtin"] else " (installed)"), ", ".join(p["hooks"]), comps)
    Console().print(table)


@cli.command()
@click.option("--rounds", default=3, show_default=True, help="Self-rewarding rounds.")
@click.option("--name", default="demo", show_default=True, help="Run folder name under runs/.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a field of the demo config.")
@_progress_option
def demo(rounds, name, overrides, progress):
    """The embedded default: a tiny model that answers and judges itself, on CPU, offline.

    Builds (or reuses) the tiny model, runs self-rewarding + DPO rounds with the live
    dashboard, then prints a table per round. Equivalent to
    `selfloop run configs/demo.toml`.
    """
    from loop.demo import run_demo

    run_demo(rounds=rounds, name=name, overrides=list(overrides), progress=progress)


def main():  # pragma: no cover - console entry
    cli()
