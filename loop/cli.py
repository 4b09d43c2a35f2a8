"""The ``selfloop`` command line.

    selfloop run configs/demo.toml --set rounds=2
    selfloop resume runs/demo
    selfloop status runs/demo
    selfloop watch runs/demo
    selfloop report runs/demo --html report.html
    selfloop compare runs/a runs/b
    selfloop demo
    selfloop plugins --json

User errors (bad config, bad path, unknown plugin) print one line and exit with code 2;
an interrupted run exits with 130 after saying how to resume it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from loop import __version__
from loop.errors import RunLocked, SelfloopError
from loop.examples import Command, write_examples

PROGRESS_CHOICE = click.Choice(["auto", "rich", "plain", "off"])


def _fail(e: SelfloopError) -> None:
    click.echo(f"Error: {e}", err=True)
    sys.exit(e.exit_code)


class Group(click.Group):
    """Turns selfloop's own errors into one line and the right exit code.

    Commands from plugins (the ``register_commands`` hook) are added the first time a
    command name is not a built-in one, or when the help lists every command, so that
    ``status`` and ``watch`` start without importing torch; the help loads installed
    plugins for that, not the built-in components (``loop.plugins.add_commands``).
    """

    _plugins_loaded = False
    command_class = Command  # every command's help ends with its examples

    def format_epilog(self, ctx, formatter):
        write_examples("cli", formatter)
        super().format_epilog(ctx, formatter)

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        type(self)._plugins_loaded = True
        from loop import plugins

        try:
            plugins.add_commands(self)
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
        except Exception as e:  # a full disk wherever it surfaced: one line, not a traceback
            from loop.diskfull import DiskFull, is_disk_full

            if not is_disk_full(e):
                raise
            where = getattr(e, "filename", None)
            folder = f"{Path(where).parent}: " if where else ""
            _fail(DiskFull(f"{folder}no space left on the device ({e}); free space there, "
                           "then run the command again"))


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


def execute(make_runner, progress: str, *, report=None, announce: bool = False) -> str:
    """Make the runner and run it under the dashboard; end with the run's summary.

    ``make_runner(build_progress)`` validates and creates (or reopens) the run; a seed
    model it builds reports through ``build_progress``, so the dashboard is up from the
    first slow step. ``report(run_dir)`` prints something before the summary (the demo's
    table); ``announce`` prints "run folder: ..." on stderr (for `run`) when no dashboard does. The terminal is held as loop/terminal.py describes. Returns the final status.
    """
    from loop import plugins, terminal
    from loop.monitor import make_monitor

    monitor = make_monitor(progress)
    live = monitor is not None and monitor.live_terminal
    runner = None
    status = "failed"
    try:
        with terminal.Session(live=live) as term:
            try:
                runner = make_runner(monitor.build_progress if monitor is not None else None)
                if live:
                    term.log_to(runner.run_dir / terminal.LOG_FILE)
                    monitor.note(f"run folder: {runner.run_dir} (stderr: {terminal.LOG_FILE})")
                elif announce:
                    click.echo(f"run folder: {runner.run_dir}", err=True)
                name = plugins.register(monitor, name="selfloop.monitor") if monitor else None
                try:
                    with monitor if monitor is not None else _null():
                        status = runner.run()
                except RunLocked:
                    runner = None  # another process runs it: no summary of its run here
                    raise
                finally:
                    if name is not None:
                        plugins.unregister(name=name)
            finally:
                if monitor is not None:
                    monitor.__exit__(None, None, None)  # a failed build left it up
    finally:
        if runner is not None and (runner.run_dir / "run.db").is_file():
            with terminal.Session():  # stderr is the terminal again; a closed stdout is fine
                _end(runner.run_dir, report if status == "completed" else None)
    return status


def _end(run_dir, report) -> None:
    """The summary on stdout; it never hides the run's own outcome."""
    from rich.console import Console

    from loop.summary import summary, summary_data

    try:
        if report is not None:
            report(run_dir)
        console = Console()
        for line in summary(summary_data(run_dir)):
            console.print(line, soft_wrap=True)
    except Exception as e:  # pragma: no cover - a summary must not mask the real error
        click.echo(f"(no summary: {e})", err=True)


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

    execute(lambda build_progress: r.start(config, list(overrides), extra_plugins=plugin_files,
                                           version=__version__, build_progress=build_progress),
            progress, announce=True)


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

    execute(lambda build_progress: r.resume(run_dir, extra_plugins=plugin_files,
                                            overrides=list(overrides), redo=redo,
                                            build_progress=build_progress), progress)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--metrics", "all_metrics", is_flag=True,
              help="Every metric of the last 10 rounds (the dashboard shows what fits).")
def status(run_dir, as_json, all_metrics):
    """Rounds x phases with durations and key metrics (reads the database read-only)."""
    from loop.monitor import all_metrics_table, status_data, status_table

    _show(run_dir, status_data, all_metrics_table if all_metrics else status_table, as_json)


def _show(run_dir, data_fn, table_fn, as_json: bool, width: int | None = None) -> None:
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
        # A pipe gets ``width`` columns (rich's default of 80 would squeeze a wide table).
        Console(width=None if sys.stdout.isatty() else width).print(table_fn(data))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Draw the dashboard once and exit.")
def watch(run_dir, interval, once):
    """The live dashboard of a run, from another terminal (read-only)."""
    from loop.monitor import watch as do_watch

    snap = do_watch(run_dir, interval=interval, once=once)
    if snap is not None and snap.note:  # the writer died: said on the last line; exit 1
        sys.exit(1)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--html", "html", type=click.Path(dir_okay=False), default=None,
              help="Also write one self-contained HTML page with plots (no network needed).")
@click.option("--png", "png_dir", type=click.Path(file_okay=False), default=None,
              help="Also write each plot as a PNG into this folder.")
def report(run_dir, as_json, html, png_dir):
    """One row per round: the run's evaluators (win rates, accuracies), judges' parse
    failures, training examples, reward margin, train loss, length, seconds."""
    from loop.report import report_data, report_table

    _show(run_dir, report_data, report_table, as_json, width=160)
    if html or png_dir:
        from loop.html_report import write_report
        from loop.report_read import open_run

        for path in write_report(open_run(run_dir), html=html, png_dir=png_dir):
            click.echo(f"wrote {path}", err=True)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--html", "html", type=click.Path(dir_okay=False), default=None,
              help="Also write one HTML page with every metric's curves overlaid.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def compare(run_dirs, html, as_json):
    """Runs side by side: key metrics per round, and their config differences.

    selfloop compare runs/a runs/b --html compare.html
    """
    from rich.console import Console

    from loop import compare as cmp

    reps, labels = cmp.load(list(run_dirs))
    if as_json:
        click.echo(json.dumps(cmp.compare_data(reps, labels), indent=2, default=str))
    else:
        Console().print(cmp.compare_tables(reps, labels))
    if html:
        click.echo(f"wrote {cmp.write_compare_html(reps, labels, html)}", err=True)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["trl-dpo", "trl-sft", "trl-kto", "jsonl"]),
              default="jsonl", show_default=True,
              help="trl-dpo/trl-sft/trl-kto: TRL's conversational formats; jsonl: plain text.")
@click.option("--round", "round_", type=int, default=None, help="Only this round (default: all).")
@click.option("-o", "--output", default="-", show_default=True,
              help="A .jsonl or .parquet file (never inside a run folder); - writes JSON Lines to stdout.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def export(run_dir, fmt, round_, output, force):
    """Write a run's training data (pairs, or selected answers) for other trainers.

    \b
      selfloop export runs/demo --format trl-dpo -o pairs.jsonl
      selfloop export runs/demo --format trl-kto --round 2 -o round2.parquet
    """
    from loop.export import export_rows, output_kind, write_jsonl, write_parquet
    from loop.integrity import reading
    from loop.monitor import open_reader
    from loop.output import check_output, open_output

    if output != "-":  # checked before the database is read
        check_output(output, force=force, protect=(run_dir,))
    kind = output_kind(output)
    with reading(run_dir):
        store = open_reader(run_dir)
        try:
            rows = export_rows(store, fmt, round_)
        finally:
            store.close()
    # Written to a temp file beside the target, renamed into place at the end.
    with open_output(output, force=force, protect=(run_dir,), binary=kind == "parquet") as out:
        (write_parquet if kind == "parquet" else write_jsonl)(rows, out)
    where = "stdout" if output == "-" else output
    click.echo(f"exported {len(rows)} {fmt} rows to {where}", err=True)


@cli.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--options", "options_of", metavar="NAME",
              help="A component's options (type, default, what it does); KIND/NAME when "
                   "several kinds share NAME.")
@_plugin_option
def plugins_cmd(as_json, options_of, plugin_files):
    """List plugins, their hooks and the components they register."""
    from loop import plugins

    for f in plugin_files:
        plugins.load_plugin_file(f)
    cli._load_plugin_commands()
    if options_of:
        _print_options(options_of, as_json)
        return
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


def _print_options(name: str, as_json: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from loop.options_doc import find_components, option_rows

    found = [(kind, cls, option_rows(kind, cls)) for kind, cls in find_components(name)]
    if as_json:
        click.echo(json.dumps([{"kind": k, "name": c.name, "plugin": c.plugin, "options": rows}
                               for k, c, rows in found], indent=2, default=str))
        return
    console = Console()
    for kind, cls, rows in found:
        table = Table("option", "type", "default", "what it does", title_justify="left",
                      title=escape(f"{kind} {cls.name!r} (plugin {cls.plugin}): "
                                   f"{_first_line(cls.__doc__)}"))
        for row in rows:
            table.add_row(row["name"], escape(row["type"]), escape(_toml(row["default"])),
                          escape(row["description"]))
        if not rows:
            table.caption = "no options"
        console.print(table)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0]


def _toml(value) -> str:
    if value == "required":
        return value
    if value is None:
        return "(none)"
    return json.dumps(value, default=str) if not isinstance(value, bool) else str(value).lower()


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


@cli.command()
@click.argument("model")
@click.option("-o", "--output", default="run.toml", show_default=True,
              help="The config file to write ('-': print it).")
@click.option("--generator", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="hf: transformers on the training model; vllm: a vLLM engine.")
@click.option("--prompts", default="prompts.jsonl", show_default=True,
              help="Your prompts: JSONL with a \"prompt\" per line, or one prompt per line.")
@click.option("--name", default=None, help="The run's name (default: the model's).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def init(model, output, generator, prompts, name, force):
    """Write a commented starter config for MODEL (a model folder or a cached hub name)."""
    from loop.errors import UserError
    from loop.starter import describe_model, starter_config

    s = describe_model(model)
    out = Path(output)
    if output != "-" and out.exists() and not force:
        raise UserError(f"{output} exists; choose another -o or add --force to overwrite it")
    s.generator, s.prompts = generator, prompts
    if Path(prompts).is_file():  # config paths are relative to the config file's folder
        folder = Path.cwd() if output == "-" else out.resolve().parent
        s.prompts = os.path.relpath(Path(prompts).resolve(), folder)
    if name:
        s.name = name
    text = starter_config(s)
    if output == "-":
        click.echo(text, nl=False)
        return
    out.write_text(text)
    click.echo(f"wrote {output}: `selfloop run {output}` starts it"
               + ("" if Path(prompts).is_file() else f" once {prompts} holds your prompts"),
               err=True)


def main():  # pragma: no cover - console entry
    from loop import malloc
    from loop.threads import early_env

    early_env()  # OpenMP wait policy, before anything imports torch (loop/threads.py)
    try:
        malloc.tune()  # before the first tensors: glibc keeps freed ones for reuse
    except SelfloopError as e:
        _fail(e)
    cli()
