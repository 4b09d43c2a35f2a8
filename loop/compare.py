"""``selfloop compare RUN_A RUN_B [...]``: runs side by side.

    selfloop compare runs/demo runs/demo-beta05
    selfloop compare runs/a runs/b runs/c --html compare.html

The terminal gets one table per key metric (a row per round, a column per run, and the
difference B - A for two runs) and the config keys whose values differ. ``--html`` writes
one self-contained page with every metric group's curves overlaid (one colour per run),
training loss per step, seconds per phase, and the same tables. Runs are read read-only.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from jinja2 import Environment
from rich.columns import Columns
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from loop.errors import UserError
from loop.html_report import KEY_METRICS, STYLE, fmt, write_atomic
from loop.plots import compare_plots, png
from loop.report_read import RunReport, flat_config, open_run

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
COMPARED = KEY_METRICS + (("seconds", "seconds"),)


def load(run_dirs: list[str]) -> tuple[list[RunReport], list[str]]:
    if len(run_dirs) < 2:
        raise UserError("compare needs two or more run folders, e.g. `selfloop compare runs/a runs/b`")
    if len(run_dirs) > len(LETTERS):
        raise UserError(f"compare takes at most {len(LETTERS)} runs")
    reps = [open_run(d) for d in run_dirs]
    names = [r.name for r in reps]
    labels = [f"{LETTERS[i]}: {r.name}" if names.count(r.name) == 1 else f"{LETTERS[i]}: {r.path}"
              for i, r in enumerate(reps)]
    return reps, labels


def value(rep: RunReport, round: int, key: str):
    if key == "seconds":
        return rep.round_seconds.get(round)
    return rep.metrics.get(round, {}).get(key)


def config_diff(reps: list[RunReport]) -> list[tuple[str, list]]:
    """Flattened config keys whose values differ between the runs (missing: None)."""
    flats = [flat_config(r.config) for r in reps]
    keys = sorted(set().union(*flats))
    return [(k, [f.get(k) for f in flats]) for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1]


def compare_data(reps: list[RunReport], labels: list[str]) -> dict:
    rounds = sorted(set().union(*(r.metrics for r in reps)))
    return {
        "runs": [{"label": lab, "name": r.name, "path": str(r.path), "status": r.status,
                  "rounds": r.rounds} for lab, r in zip(labels, reps)],
        "metrics": {key: {str(rd): [value(r, rd, key) for r in reps] for rd in rounds}
                    for key, _ in COMPARED},
        "config_diff": {k: v for k, v in config_diff(reps)},
    }


def compare_tables(reps: list[RunReport], labels: list[str]) -> Group:
    legend = Table.grid(padding=(0, 2))
    for lab, r in zip(labels, reps):
        legend.add_row(escape(lab), escape(f"{r.path}  [{r.status}]  {r.rounds} rounds"))
    rounds = sorted(set().union(*(r.metrics for r in reps)))
    letters = [LETTERS[i] for i in range(len(reps))]
    tables = []
    for key, title in COMPARED:
        if all(value(r, rd, key) is None for r in reps for rd in rounds):
            continue
        t = Table(title=escape(title), title_justify="left", padding=(0, 1))
        t.add_column("round", justify="right")
        for letter in letters:
            t.add_column(letter, justify="right")
        if len(reps) == 2:
            t.add_column("B-A", justify="right", style="cyan")
        for rd in rounds:
            vals = [value(r, rd, key) for r in reps]
            cells = [fmt(v) for v in vals]
            if len(reps) == 2:
                cells.append(fmt(vals[1] - vals[0]) if None not in vals else "-")
            t.add_row(str(rd), *cells)
        tables.append(t)
    parts = [legend, Columns(tables, padding=(0, 3))]
    diff = config_diff(reps)
    d = Table(title="config differences", title_justify="left")
    d.add_column("key")
    for letter in letters:
        d.add_column(letter)
    for key, vals in diff:
        d.add_row(escape(key), *(escape(_short(v)) for v in vals))
    if not diff:
        d.caption = "none: the configs are the same"
    parts.append(d)
    return Group(*parts)


def _short(v) -> str:
    s = "-" if v is None else (v if isinstance(v, str) else json.dumps(v))
    return s if len(s) <= 60 else s[:57] + "..."


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>selfloop compare: {{ title }}</title>
<style>{{ style }}</style></head><body>
<h1>selfloop compare</h1>
<table><tr><th>run</th><th>folder</th><th>status</th><th>rounds</th></tr>
{% for r in data.runs %}<tr><td>{{ r.label }}</td><td>{{ r.path }}</td><td>{{ r.status }}</td>
<td class="num">{{ r.rounds }}</td></tr>{% endfor %}</table>
<h2>Key metrics per round</h2>
<table><tr><th>round</th>{% for key, label in keys %}{% for r in data.runs %}
<th>{{ label }} {{ r.label[0] }}</th>{% endfor %}{% endfor %}</tr>
{% for rd in rounds %}<tr><td class="num">{{ rd }}</td>{% for key, _ in keys %}
{% for v in data.metrics[key][rd|string] %}<td class="num">{{ fmt(v) }}</td>{% endfor %}{% endfor %}</tr>{% endfor %}
</table>
<h2>Curves</h2>
{% for p in plots %}<figure class="plot" id="plot-{{ p.key }}" data-key="{{ p.key }}"{% if p.group %} data-group="{{ p.group }}"{% endif %}>
<figcaption>{{ p.title }}</figcaption><img alt="{{ p.title }}" src="data:image/png;base64,{{ images[p.key] }}"></figure>{% endfor %}
<h2 id="config">Config differences</h2>
{% if diff %}<table><tr><th>key</th>{% for r in data.runs %}<th>{{ r.label }}</th>{% endfor %}</tr>
{% for key, vals in diff %}<tr><td>{{ key }}</td>{% for v in vals %}<td><code>{{ show(v) }}</code></td>{% endfor %}</tr>{% endfor %}
</table>{% else %}<p>none: the configs are the same</p>{% endif %}
</body></html>
"""


def write_compare_html(reps: list[RunReport], labels: list[str], path: str | Path) -> Path:
    plots = compare_plots(reps, labels)
    images = {p.key: base64.b64encode(png(p.figure)).decode("ascii") for p in plots}
    html = Environment(autoescape=True).from_string(TEMPLATE).render(
        title=" vs ".join(r.name for r in reps), style=STYLE, data=compare_data(reps, labels),
        keys=COMPARED, rounds=sorted(set().union(*(r.metrics for r in reps))), plots=plots,
        images=images, diff=config_diff(reps), fmt=fmt,
        show=lambda v: "-" if v is None else (v if isinstance(v, str) else json.dumps(v)),
    )
    return write_atomic(Path(path), html)
