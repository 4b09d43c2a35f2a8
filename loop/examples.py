"""The examples under each command's ``--help``, in one place.

Every built-in command has two or three: a command line and what it does. They are
real: tests/test_help.py parses each against the command's own options (and runs the
ones that need no model). A plugin's command (``register_commands``) may add its own:
``loop.examples.EXAMPLES["mycommand"] = [("selfloop mycommand ...", "what it does")]``.
"""

from __future__ import annotations

import click

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "cli": [
        ("selfloop demo", "a tiny model improves itself on CPU, offline (about a minute)"),
        ("selfloop init /models/my-model -o run.toml && selfloop run run.toml",
         "a starter config for your model, then the run"),
        ("selfloop COMMAND --help", "each command's options and examples"),
    ],
    "run": [
        ("selfloop run configs/demo.toml",
         "the embedded demo as a config: a tiny model improves itself, CPU, offline"),
        ("selfloop run run.toml --set rounds=5 --set generate.n=8",
         "override fields of the config (repeatable; lists and tables in TOML syntax)"),
        ("selfloop run run.toml --progress plain 2>&1 | tee run.txt",
         "log lines instead of the live dashboard (the default when stdout is no terminal)"),
    ],
    "resume": [
        ("selfloop resume runs/demo",
         "continue a stopped run: done phases are skipped, an interrupted one re-runs"),
        ("selfloop resume runs/demo --set judges.0.max_new_tokens=512",
         "change an option for the phases still to run (after a failure, say)"),
    ],
    "status": [
        ("selfloop status runs/demo",
         "rounds x phases: durations, progress, failures, key metrics"),
        ("selfloop status runs/demo --metrics", "every metric of the last 10 rounds"),
        ("selfloop status runs/demo --json", "the same as JSON, every round, for scripts"),
    ],
    "watch": [
        ("selfloop watch runs/demo", "the live dashboard of a run, from another terminal"),
        ("selfloop watch runs/demo --once", "draw it once and exit (a snapshot in a log)"),
    ],
    "report": [
        ("selfloop report runs/demo", "one row per round: every evaluator, parse failures, examples, loss"),
        ("selfloop report runs/demo --json", "the same rows as JSON"),
        ("selfloop report runs/demo --html report.html --png plots",
         "one offline page with every plot, and each plot as a PNG"),
    ],
    "compare": [
        ("selfloop compare runs/demo runs/mine", "key metrics per round side by side, config differences"),
        ("selfloop compare runs/a runs/b runs/c --html compare.html", "every metric's curves overlaid"),
    ],
    "export": [
        ("selfloop export runs/demo --format trl-dpo -o pairs.jsonl",
         "selected pairs as TRL's conversational DPO rows (system prompt included)"),
        ("selfloop export runs/demo --format trl-kto --round 2 -o round2.parquet",
         "only round 2, labelled answers, as Parquet"),
        ("selfloop export runs/demo -o pairs.jsonl --force", "plain JSONL, replacing an existing file"),
    ],
    "plugins": [
        ("selfloop plugins", "loaded plugins, their hooks and the components they register"),
        ("selfloop plugins --options self_reward",
         "a component's options: type, default and what each does"),
        ("selfloop plugins --plugin my_judge.py --options judge/my_judge",
         "the same for a one-file plugin's judge (KIND/NAME when a name has several kinds)"),
    ],
    "demo": [
        ("selfloop demo", "build the tiny model (cached), 3 self-rewarding rounds, the table"),
        ("selfloop demo --rounds 1 --name quick", "one round, in runs/quick"),
        ("selfloop demo --set updater.beta=0.3 --name beta03",
         "the demo with one of its fields changed"),
    ],
    "init": [
        ("selfloop init /models/Qwen2.5-1.5B-Instruct -o run.toml",
         "a commented starter config for a local model folder"),
        ("selfloop init Qwen/Qwen2.5-0.5B-Instruct --generator vllm --prompts prompts.jsonl "
         "-o run.toml", "the same on vLLM, for a cached hub model and your prompts"),
    ],
}


def write_examples(name: str, formatter: click.HelpFormatter) -> None:
    """An "Examples" section with ``EXAMPLES[name]``: each line as written (not rewrapped)."""
    examples = EXAMPLES.get(name)
    if examples:
        with formatter.section("Examples"):
            for line, what in examples:
                formatter.write(f"{'':{formatter.current_indent}}{line}\n")
                formatter.write(f"{'':{formatter.current_indent + 4}}{what}\n")


class Command(click.Command):
    """A click command whose help ends with its ``EXAMPLES``."""

    def format_epilog(self, ctx, formatter) -> None:
        write_examples(self.name or "", formatter)
        super().format_epilog(ctx, formatter)
