"""Judge-quality figures, computed by the runner for every judge, every round.

Pure functions over records, so any judge (built-in or a plugin's) gets them for free:

- ``judge_figures``: per judge label, ``judge/<label>/judgments``, ``parse_failure_rate``
  (samples with no score: unparseable or failed requests), ``mean_score``,
  ``score_spread`` (self-consistency: the mean over candidates with two or more valid
  samples of the standard deviation of their scores; 0 = the judge always repeats
  itself) and ``length_corr`` (Pearson correlation of a candidate's mean score with its
  length: self-rewarding judges are known to reward length, Yuan et al. 2024, sec. 3);
- ``selection_figures``: ``select/length_ratio`` (mean chosen length / mean rejected
  length over the selected pairs) and ``select/length_corr`` (combined score vs length);
- ``prefixed``: a judge's own ``judge/`` metrics moved under its label
  (``judge/position_bias`` of judge ``cai`` -> ``judge/cai/position_bias``), so two judges
  never overwrite each other or the runner's pooled ``judge/`` figures.

Length is ``num_tokens`` when every candidate has it, else characters.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from loop import components as c


def prefixed(metrics: dict[str, float], label: str) -> dict[str, float]:
    """A judge's ``judge/name`` metrics -> ``judge/<label>/name``; other groups as written.

    The ``judge/`` group is shared by every judge and the runner's pooled figures, so a
    judge's own entries there go under its label; a plugin's own group stays its own.
    """
    return {
        (f"judge/{label}/{key[len('judge/'):]}" if key.startswith("judge/") else key): value
        for key, value in metrics.items()
    }


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r, or None with fewer than two points or a constant series."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _std(xs: Sequence[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def lengths(cands: Iterable[c.Candidate]) -> list[float]:
    cands = list(cands)
    if all(x.num_tokens is not None for x in cands):
        return [float(x.num_tokens) for x in cands]
    return [float(len(x.text)) for x in cands]


def judge_figures(judgments: Sequence[c.Judgment], label: str) -> dict[str, float]:
    """Quality figures of one judge's judgments this round (see the module docstring)."""
    if not judgments:
        return {}
    key = f"judge/{label}/"
    valid = [j for j in judgments if j.score is not None]
    out = {
        key + "judgments": float(len(judgments)),
        key + "parse_failure_rate": (len(judgments) - len(valid)) / len(judgments),
    }
    if not valid:
        return out
    out[key + "mean_score"] = sum(j.score for j in valid) / len(valid)
    per: dict[int, list[float]] = {}
    cand_of: dict[int, c.Candidate] = {}
    for j in valid:
        per.setdefault(id(j.candidate), []).append(j.score)
        cand_of[id(j.candidate)] = j.candidate
    repeated = [_std(s) for s in per.values() if len(s) >= 2]
    if repeated:
        out[key + "score_spread"] = sum(repeated) / len(repeated)
    means = [sum(s) / len(s) for s in per.values()]
    r = pearson(lengths(cand_of[k] for k in per), means)
    if r is not None:
        out[key + "length_corr"] = r
    return out


def selection_figures(pairs: Sequence[c.Pair], candidates: Sequence[c.Candidate],
                      scores: dict[int, float]) -> dict[str, float]:
    """Length bias of what the selector trains on, and of the combined scores."""
    out: dict[str, float] = {}
    if pairs:
        both = lengths([*(p.chosen for p in pairs), *(p.rejected for p in pairs)])
        chosen, rejected = both[: len(pairs)], both[len(pairs):]
        if sum(rejected) > 0:
            out["select/length_ratio"] = (sum(chosen) / len(chosen)) / (sum(rejected) / len(rejected))
    scored = [x for x in candidates if x.id in scores]
    r = pearson(lengths(scored), [scores[x.id] for x in scored])
    if r is not None:
        out["select/length_corr"] = r
    return out


def length_bias_warnings(metrics: dict[str, float], corr_threshold: float,
                         ratio_threshold: float) -> list[str]:
    """Dashboard warnings for one round's metrics (empty when nothing passes a threshold)."""
    out = []
    for name in sorted(metrics):
        value = metrics[name]
        if value is None:
            continue
        if name.endswith("/length_corr") and value > corr_threshold:
            out.append(f"length bias: {name} = {value:.2f} > {corr_threshold:g} "
                       "(longer answers score higher)")
        elif name == "select/length_ratio" and value > ratio_threshold:
            out.append(f"length bias: {name} = {value:.2f} > {ratio_threshold:g} "
                       "(chosen answers longer than rejected)")
    return out
