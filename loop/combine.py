"""One score per candidate from several judges: ``[selection] combine``.

Judges score on their own scales (the rubric 0..5, a pairwise judge's P(preferred) in
[0, 1], a reward model's logits), and not every judge scores every candidate (a pairwise
judge compares a sample of pairs; a rubric output may not parse). Averaging whatever a
candidate happens to have mixes those scales: two answers both rated [3, 5] by the rubric
became 4.0 vs 2.83 because only one of them met the pairwise judge. So (``combine``):

1. Per (candidate, judge): the mean of the judge's valid samples.
2. Eligibility, per prompt: the prompt's *panel* is every judge that scored at least one
   of its candidates; a candidate missing a panel judge is ineligible (left out of the
   scores, counted in ``select/ineligible``). Selectors compare candidates of one prompt,
   so every comparison is then between candidates scored by exactly the same judges.
   (The other sound rule, dropping the judge for that prompt, would silence a pairwise
   judge on most prompts; dropping the candidate keeps every judge's say.)
3. Normalise per judge: ``mean`` keeps raw scores (one judge, or judges on one scale);
   ``zscore`` subtracts the judge's mean and divides by its standard deviation over the
   round's candidates it scored (a constant judge gives 0); ``rank`` replaces each score
   by its mid-rank within the prompt's eligible candidates, scaled to [0, 1] (ties share
   a rank; a lone candidate gets 0.5).
4. The weighted mean over the panel (weights from ``[[judges]] weight``).

``combine`` is a pure function of the judgment rows, so it is tested on hand-built cases
(tests/test_combine.py) and the runner only feeds it the round's rows.
"""

from __future__ import annotations

import math
from typing import Hashable, Iterable, Literal

Method = Literal["mean", "zscore", "rank"]
METHODS = ("mean", "zscore", "rank")


def combine(
    rows: Iterable[tuple[Hashable, Hashable, str, float | None]],
    weights: dict[str, float],
    method: Method = "mean",
) -> tuple[dict[Hashable, float], set[Hashable]]:
    """``rows``: (candidate, prompt, judge, score or None). Returns (combined score per
    eligible candidate, the ineligible candidates)."""
    if method not in METHODS:
        raise ValueError(f"unknown combine method {method!r}; choose one of {METHODS}")
    samples: dict[Hashable, dict[str, list[float]]] = {}
    group: dict[Hashable, Hashable] = {}
    for cid, prompt, judge, score in rows:
        group[cid] = prompt
        if score is not None:
            samples.setdefault(cid, {}).setdefault(judge, []).append(float(score))
    means = {cid: {j: sum(s) / len(s) for j, s in by.items()} for cid, by in samples.items()}
    panel: dict[Hashable, set[str]] = {}
    for cid, by in means.items():
        panel.setdefault(group[cid], set()).update(by)
    eligible = [cid for cid, by in means.items() if set(by) == panel[group[cid]]]
    ineligible = set(means) - set(eligible)
    norm = _normalise(means, eligible, group, method)
    out = {}
    for cid in eligible:
        judges = panel[group[cid]]
        den = sum(weights.get(j, 1.0) for j in judges)
        out[cid] = sum(weights.get(j, 1.0) * norm[cid][j] for j in judges) / den
    return out, ineligible


def _normalise(means, eligible, group, method) -> dict[Hashable, dict[str, float]]:
    if method == "mean":
        return means
    if method == "zscore":
        stats = {}
        for judge in {j for by in means.values() for j in by}:
            xs = [by[judge] for by in means.values() if judge in by]
            mu = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))
            stats[judge] = (mu, sd)
        return {cid: {j: ((s - stats[j][0]) / stats[j][1] if stats[j][1] > 0 else 0.0)
                      for j, s in by.items()} for cid, by in means.items()}
    # rank: within each prompt's eligible candidates, per judge
    by_prompt: dict[Hashable, list[Hashable]] = {}
    for cid in eligible:
        by_prompt.setdefault(group[cid], []).append(cid)
    out: dict[Hashable, dict[str, float]] = {}
    for cids in by_prompt.values():
        for cid in cids:
            out[cid] = {}
            for judge, s in means[cid].items():
                others = [means[o][judge] for o in cids]
                n = len(others)
                less = sum(x < s for x in others)
                equal = sum(x == s for x in others)  # includes itself
                out[cid][judge] = 0.5 if n == 1 else (less + (equal - 1) / 2) / (n - 1)
    return out
