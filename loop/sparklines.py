"""Sparklines: a metric's values over rounds as one line of block characters.

    >>> sparkline([0.4, 0.8, 0.98, 0.97])
    '▁▆██'

``trends`` lays out the key metrics of a run this way for the dashboard and ``watch``
(loop/monitor.py): label, sparkline over the last rounds, latest value.
"""

from __future__ import annotations

import math

from rich.columns import Columns
from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None]) -> str:
    """One block per value, scaled between the smallest and largest; a gap for None/NaN."""
    seen = [v for v in values if v is not None and math.isfinite(v)]
    if not seen:
        return " " * len(values)
    lo, hi = min(seen), max(seen)
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif hi == lo:
            out.append(BLOCKS[len(BLOCKS) // 2])
        else:
            out.append(BLOCKS[round((v - lo) / (hi - lo) * (len(BLOCKS) - 1))])
    return "".join(out)


def trends(metrics: dict[int, dict[str, float]], keys, last: int = 20, fmt=str) -> Columns | None:
    """The key metrics (``(name, label)`` pairs) over the last rounds, or None when no key
    metric has two rounds yet."""
    rounds = sorted(metrics)[-last:]
    items = []
    for name, label in keys:
        values = [metrics[r].get(name) for r in rounds]
        present = [v for v in values if v is not None]
        if len(present) < 2:
            continue
        # Rounds before the metric's first value (round 0 has no pairs) are not shown.
        first = next(i for i, v in enumerate(values) if v is not None)
        line = Text(f"{label} ", style="bold")
        line.append(sparkline(values[first:]), style="cyan")
        line.append(f" {fmt(present[-1])}")
        items.append(line)
    return Columns(items, padding=(0, 3)) if items else None
