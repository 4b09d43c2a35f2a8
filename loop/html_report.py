"""``selfloop report RUN --html FILE [--png DIR]``: one self-contained HTML page per run.

    selfloop report runs/demo --html report.html --png plots/

The page needs no network: plots are PNGs (matplotlib, see loop/plots.py) embedded as
base64, the style is inline and there is no script. It holds: the key metrics per round;
a plot per metric group (every ``eval/*``, ``judge/*``, ``select/*`` ... metric against
round); training loss and rewards per step across rounds; generation lengths; pair
margins; seconds per phase; a few example pairs per round with the judges' raw text;
OPRO's instruction history and the prompt rewrites used, when the run has them; warnings
and errors; the resolved config.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from jinja2 import Environment

from loop.plots import Plot, png, report_plots
from loop.report_read import RunReport, read_run

# Sections of the page: (title, the metric groups and extra plots shown there).
SECTIONS = (
    ("Held-out evaluation", ("eval",), ()),
    ("Judge quality", ("judge",), ()),
    ("Selection", ("select",), ("margins",)),
    ("Training", ("train", "rewards"), ("training",)),
    ("Generation", ("generate",), ("lengths",)),
    ("Timings", (), ("timings",)),
)
KEY_METRICS = (
    ("eval/accuracy", "held-out accuracy"),
    ("judge/verifier_agreement", "judge agreement"),
    ("judge/parse_failure_rate", "judge parse failures"),
    ("select/pairs", "pairs"),
    ("rewards/margin", "reward margin"),
    ("generate/mean_tokens", "mean length"),
)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1500px; padding: 1em 2em; color: #222; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 2px 8px; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: .8em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-weight: 600; margin-bottom: .3em; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; white-space: pre-wrap; font-size: 12px; }
.meta { color: #555; } .warning { color: #8a5a00; } .error { color: #b00020; }
nav a { margin-right: 1em; } details { margin: .4em 0; } summary { cursor: pointer; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
"""

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>selfloop report: {{ rep.name }}</title><style>{{ style }}</style></head>
<body>
<h1>selfloop report: {{ rep.name }}</h1>
<p class="meta">status <b>{{ rep.status }}</b> · {{ done }} of {{ rep.rounds }} rounds done
 (round 0 evaluates the starting policy) · model {{ rep.run.get("model_path") or "?" }}
 · created {{ rep.run.get("created_at") or "?" }} · selfloop {{ rep.run.get("selfloop_version") or "?" }}
 · {{ rep.path }}</p>
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title }}</a>{% endfor %}
<a href="#examples">Examples</a>{% if rep.instructions %}<a href="#opro">Instructions</a>{% endif %}
{% if rep.rewrites %}<a href="#rewrites">Rewrites</a>{% endif %}<a href="#config">Config</a></nav>

<h2 id="summary">Key metrics per round</h2>
<table><tr><th>round</th>{% for _, label in keys %}<th>{{ label }}</th>{% endfor %}<th>seconds</th></tr>
{% for r in rounds %}<tr><td class="num">{{ r }}</td>
{% for key, _ in keys %}<td class="num">{{ fmt(rep.metrics[r].get(key)) }}</td>{% endfor %}
<td class="num">{{ fmt(rep.round_seconds.get(r)) }}</td></tr>{% endfor %}</table>

{% for s in sections %}
<section id="{{ s.id }}"><h2>{{ s.title }}</h2>
{% for p in s.plots %}
<figure class="plot" id="plot-{{ p.key }}" data-key="{{ p.key }}"{% if p.group %} data-group="{{ p.group }}"{% endif %}>
<figcaption>{{ p.title }}</figcaption>
<img alt="{{ p.title }}" src="data:image/png;base64,{{ images[p.key] }}"></figure>
{% if p.group %}<details><summary>values</summary><table><tr><th>metric</th>
{% for r in rounds %}<th>r{{ r }}</th>{% endfor %}</tr>
{% for name in groups[p.group] %}<tr><td>{{ name }}</td>
{% for r in rounds %}<td class="num">{{ fmt(rep.metrics[r].get(name)) }}</td>{% endfor %}</tr>{% endfor %}
</table></details>{% endif %}
{% endfor %}
{% if not s.plots %}<p class="meta">nothing recorded</p>{% endif %}
</section>
{% endfor %}

<section id="examples"><h2>Example pairs</h2>
{% for r, pairs in rep.examples.items() %}<details{% if loop.first %} open{% endif %}>
<summary>round {{ r }}: {{ pairs|length }} of its selected pairs</summary>
{% for p in pairs %}<h4>prompt</h4><pre>{{ p.prompt }}</pre>
<div class="pair"><div><b>chosen</b> (score {{ fmt(p.chosen_score) }})<pre>{{ p.chosen }}</pre>
{% for j in p.chosen_judgments %}<div class="meta">judge {{ j.judge }} sample {{ j.sample_index }}:
 score {{ fmt(j.score) }}</div><pre>{{ j.raw }}</pre>{% endfor %}</div>
<div><b>rejected</b> (score {{ fmt(p.rejected_score) }})<pre>{{ p.rejected }}</pre>
{% for j in p.rejected_judgments %}<div class="meta">judge {{ j.judge }} sample {{ j.sample_index }}:
 score {{ fmt(j.score) }}</div><pre>{{ j.raw }}</pre>{% endfor %}</div></div>
<p class="meta">margin {{ fmt(p.margin) }} · source {{ p.source }}</p>{% endfor %}
</details>{% else %}<p class="meta">no selected pairs</p>{% endfor %}
</section>

{% if rep.instructions %}<section id="opro"><h2>OPRO instruction history</h2>
<table><tr><th>round</th><th>optimiser</th><th>step</th><th>score</th><th>scored on</th><th>chosen</th><th>instruction</th></tr>
{% for i in rep.instructions %}<tr><td class="num">{{ i.round }}</td><td>{{ i.optimiser }}</td>
<td class="num">{{ i.step }}</td><td class="num">{{ fmt(i.score) }}</td><td class="num">{{ i.scored_on }}</td>
<td>{{ "yes" if i.chosen else "" }}</td><td>{{ i.text }}</td></tr>{% endfor %}</table></section>{% endif %}

{% if rep.rewrites %}<section id="rewrites"><h2>Prompt rewrites (BPO)</h2>
<p class="meta">{{ used }} of {{ rep.rewrites|length }} rewrites were answered in their round.</p>
<table><tr><th>round</th><th>used</th><th>original</th><th>rewrite</th></tr>
{% for w in rep.rewrites[:60] %}<tr><td class="num">{{ w.round }}</td><td>{{ "yes" if w.used else "no" }}</td>
<td>{{ w.original }}</td><td>{{ w.rewrite }}</td></tr>{% endfor %}</table></section>{% endif %}

{% if rep.events %}<section id="events"><h2>Warnings and errors</h2><table>
<tr><th>round</th><th>phase</th><th>level</th><th>message</th></tr>
{% for e in rep.events[-50:] %}<tr class="{{ e.level }}"><td class="num">{{ e.round if e.round is not none else "" }}</td>
<td>{{ e.phase or "" }}</td><td>{{ e.level }}</td><td>{{ e.message }}</td></tr>{% endfor %}</table></section>{% endif %}

<section id="config"><h2>Config</h2><pre>{{ config }}</pre></section>
</body></html>
"""


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == int(v) and abs(v) < 1e12:
            return f"{v:.0f}"
        return f"{v:.4g}"
    return str(v)


def _sections(plots: list[Plot]) -> list[dict]:
    by_group = {p.group: p for p in plots if p.group}
    by_key = {p.key: p for p in plots}
    placed: set[str] = set()
    out = []
    for title, groups, extras in SECTIONS:
        chosen = [by_group[g] for g in groups if g in by_group] + [by_key[k] for k in extras if k in by_key]
        placed.update(p.key for p in chosen)
        out.append({"id": title.lower().replace(" ", "-"), "title": title, "plots": chosen})
    rest = [p for p in plots if p.key not in placed]
    if rest:
        out.append({"id": "other-metrics", "title": "Other metrics", "plots": rest})
    return out


def render_html(rep: RunReport, plots: list[Plot], images: dict[str, str]) -> str:
    env = Environment(autoescape=True)
    rounds = sorted(rep.metrics)
    return env.from_string(TEMPLATE).render(
        rep=rep, style=STYLE, sections=_sections(plots), images=images, rounds=rounds,
        keys=KEY_METRICS, groups=rep.groups(), fmt=fmt,
        done=sum(1 for r in rep.round_seconds if r > 0),
        used=sum(1 for w in rep.rewrites if w["used"]),
        config=json.dumps(rep.config, indent=2, sort_keys=True),
    )


def write_report(rep: RunReport, html: str | Path | None = None,
                 png_dir: str | Path | None = None) -> list[Path]:
    """Write the HTML page and/or one PNG per plot; returns the files written."""
    plots = report_plots(rep)
    pngs = {p.key: png(p.figure) for p in plots}
    written = []
    if png_dir is not None:
        folder = Path(png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for key, data in pngs.items():
            (folder / f"{key}.png").write_bytes(data)
            written.append(folder / f"{key}.png")
    if html is not None:
        images = {k: base64.b64encode(v).decode("ascii") for k, v in pngs.items()}
        written.insert(0, write_atomic(Path(html), render_html(rep, plots, images)))
    return written


def write_atomic(path: Path, text: str) -> Path:
    """Write through a temp file and rename: a reader never sees half a page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_html(store, path: str | Path) -> Path:
    """The report of an open run database (trackers log it as an artifact)."""
    return write_report(read_run(store), html=path)[0]
