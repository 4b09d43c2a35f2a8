"""The report's plots, drawn with matplotlib (``Figure`` objects, no pyplot state).

Why matplotlib: one well-kept library gives both the PNGs of ``--png DIR`` and the images
embedded in the HTML (base64), with no JavaScript and no browser needed to export; the
report stays a few hundred KB and opens offline anywhere. (plotly would add a 4 MB
script to every report and needs kaleido plus a Chrome to write PNGs.)

Each function returns a list of ``Plot`` (a key, a title, the figure); ``png(fig)``
renders one.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from loop.report_read import PHASES, RunReport

DPI = 80
CELL = (3.6, 2.4)  # inches per small plot
COLS = 4
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class Plot:
    key: str  # file name stem and HTML id: "metrics-eval", "training", ...
    title: str
    figure: Figure
    group: str | None = None  # the metric group, for the per-group plots


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _figure(cols: int, rows: int, cell: tuple[float, float] = CELL) -> Figure:
    """A figure of ``cols`` x ``rows`` cells with fixed margins in inches (a fixed layout
    costs half the time of matplotlib's constrained layout, and plots here are regular)."""
    w, h = cell[0] * cols, cell[1] * rows
    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(left=0.55 / w, right=1 - 0.15 / w, bottom=0.5 / h, top=1 - 0.3 / h,
                        wspace=0.75 / (cell[0] - 0.75), hspace=0.8 / (cell[1] - 0.8))
    return fig


def _grid(n: int, cols: int = COLS) -> tuple[Figure, list]:
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = _figure(cols, rows)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _round_axis(ax, label: str = "round", integer: bool = True) -> None:
    if integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel(label, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _title(ax, text: str) -> None:
    ax.set_title(text if len(text) <= 38 else "…" + text[-37:], fontsize=8)


def metric_group_plots(rep: RunReport) -> list[Plot]:
    """One figure per metric group: a small plot per metric, value against round."""
    out = []
    for group, names in rep.groups().items():
        fig, axes = _grid(len(names))
        for ax, name in zip(axes, names):
            xs, ys = rep.series(name)
            ax.plot(xs, ys, marker="o", markersize=3, color=COLORS[0])
            _title(ax, name)
            _round_axis(ax)
        out.append(Plot(f"metrics-{group}", f"{group}/*", fig, group))
    return out


def _steps_by_round(steps: list[dict], key: str) -> dict[int, tuple[list, list]]:
    by: dict[int, tuple[list, list]] = {}
    for s in steps:
        v = s.get(key)
        if isinstance(v, (int, float)) and v == v:
            xs, ys = by.setdefault(s["round"], ([], []))
            xs.append(s["global_step"])
            ys.append(v)
    return by


def training_plot(rep: RunReport) -> Plot | None:
    """Loss and each per-step reward across rounds (x: the run's training step)."""
    if not rep.steps:
        return None
    keys = ["loss"] + sorted({k for s in rep.steps for k in s
                              if "/" in k and isinstance(s[k], (int, float))})
    keys += [k for k in ("learning_rate", "grad_norm") if any(s.get(k) is not None for s in rep.steps)]
    fig, axes = _grid(len(keys))
    starts = sorted({min(s["global_step"] for s in rep.steps if s["round"] == r)
                     for r in {s["round"] for s in rep.steps}})
    for ax, key in zip(axes, keys):
        for r, (xs, ys) in sorted(_steps_by_round(rep.steps, key).items()):
            ax.plot(xs, ys, marker=".", markersize=3, color=COLORS[r % len(COLORS)],
                    label=f"round {r}")
        for x in starts[1:]:
            ax.axvline(x - 0.5, color="grey", linestyle=":", linewidth=0.8)
        _title(ax, key)
        _round_axis(ax, "training step (whole run)")
    axes[0].legend(fontsize=7)
    return Plot("training", "training: loss and rewards per step, across rounds", fig)


def lengths_plot(rep: RunReport) -> Plot | None:
    """Candidate lengths per round; chosen vs rejected lengths of the selected pairs."""
    if not rep.lengths:
        return None
    fig, (a, b) = _grid(2, 2)
    rounds = sorted(rep.lengths)
    a.boxplot([rep.lengths[r] for r in rounds], tick_labels=[str(r) for r in rounds], widths=0.5)
    _title(a, "candidate length (tokens), per round")
    _round_axis(a, integer=False)
    pr = sorted(rep.pair_lengths)
    if pr:
        chosen = [sum(c for c, _ in rep.pair_lengths[r]) / len(rep.pair_lengths[r]) for r in pr]
        rejected = [sum(x for _, x in rep.pair_lengths[r]) / len(rep.pair_lengths[r]) for r in pr]
        b.bar([r - 0.2 for r in pr], chosen, width=0.4, label="chosen", color=COLORS[2])
        b.bar([r + 0.2 for r in pr], rejected, width=0.4, label="rejected", color=COLORS[3])
        b.legend(fontsize=7)
    _title(b, "selected pairs: mean length (tokens)")
    _round_axis(b)
    return Plot("lengths", "generation lengths", fig)


def margins_plot(rep: RunReport) -> Plot | None:
    if not rep.margins:
        return None
    fig, (ax,) = _grid(1)
    rounds = sorted(rep.margins)
    ax.boxplot([rep.margins[r] for r in rounds], tick_labels=[str(r) for r in rounds], widths=0.5)
    _title(ax, "selected pairs: score margin")
    _round_axis(ax, integer=False)
    return Plot("margins", "selection: pair margins per round", fig)


def timings_plot(rep: RunReport) -> Plot | None:
    """Seconds per phase, stacked per round."""
    if not rep.phase_seconds:
        return None
    fig = _figure(1, 1, (CELL[0] * 2, CELL[1] * 1.4))
    ax = fig.add_subplot()
    rounds = sorted(rep.phase_seconds)
    bottom = [0.0] * len(rounds)
    for i, phase in enumerate(PHASES):
        vals = [rep.phase_seconds[r].get(phase, 0.0) for r in rounds]
        if any(vals):
            ax.bar(rounds, vals, bottom=bottom, label=phase, color=COLORS[i % len(COLORS)])
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds", fontsize=8)
    ax.legend(fontsize=7, ncols=2)
    _title(ax, "seconds per phase")
    _round_axis(ax)
    return Plot("timings", "timings per phase", fig)


def report_plots(rep: RunReport) -> list[Plot]:
    """Every plot of one run's report, in the report's order."""
    extra = [training_plot(rep), lengths_plot(rep), margins_plot(rep), timings_plot(rep)]
    return metric_group_plots(rep) + [p for p in extra if p is not None]


# -- several runs ---------------------------------------------------------------------


def compare_plots(reps: list[RunReport], labels: list[str]) -> list[Plot]:
    """Overlaid curves: per metric group, per training step, and phase timings."""
    groups: dict[str, set[str]] = {}
    for rep in reps:
        for g, names in rep.groups().items():
            groups.setdefault(g, set()).update(names)
    out = []
    for group, names in groups.items():
        names = sorted(names)
        fig, axes = _grid(len(names))
        for ax, name in zip(axes, names):
            for i, rep in enumerate(reps):
                xs, ys = rep.series(name)
                if xs:
                    ax.plot(xs, ys, marker="o", markersize=3, color=COLORS[i % len(COLORS)],
                            label=labels[i])
            _title(ax, name)
            _round_axis(ax)
        # Every run in the legend, also those without this group's first metric.
        handles = [Line2D([], [], marker="o", markersize=3, color=COLORS[i % len(COLORS)])
                   for i in range(len(reps))]
        axes[0].legend(handles, labels, fontsize=7)
        out.append(Plot(f"metrics-{group}", f"{group}/*", fig, group))
    if any(rep.steps for rep in reps):
        fig, (ax,) = _grid(1, 1)
        for i, rep in enumerate(reps):
            ax.plot([s["global_step"] for s in rep.steps], [s["loss"] for s in rep.steps],
                    marker=".", markersize=3, color=COLORS[i % len(COLORS)], label=labels[i])
        _title(ax, "training loss per step (whole run)")
        _round_axis(ax, "training step")
        ax.legend(fontsize=7)
        out.append(Plot("training", "training loss", fig))
    if any(rep.phase_seconds for rep in reps):
        fig = _figure(1, 1, (CELL[0] * 2, CELL[1] * 1.4))
        ax = fig.add_subplot()
        width = 0.8 / len(reps)
        for i, rep in enumerate(reps):
            totals = [sum(s.get(p, 0.0) for s in rep.phase_seconds.values()) for p in PHASES]
            ax.bar([k + (i - (len(reps) - 1) / 2) * width for k in range(len(PHASES))], totals,
                   width=width, color=COLORS[i % len(COLORS)], label=labels[i])
        ax.set_xticks(range(len(PHASES)), PHASES, fontsize=7)
        ax.set_ylabel("seconds (all rounds)", fontsize=8)
        ax.legend(fontsize=7)
        _title(ax, "seconds per phase, whole run")
        out.append(Plot("timings", "timings per phase", fig))
    return out
