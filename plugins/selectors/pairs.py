"""Preference pairs: per prompt, the best-scored candidate against the worst (Self-Rewarding
Language Models, Yuan et al., 2024, section 2.3: "highest and lowest scoring responses",
pairs with equal scores discarded).

Config::

    [selector]
    name = "pairs"
    min_margin = 0.0     # keep a pair only if chosen_score - rejected_score > min_margin
"""

from __future__ import annotations

from collections import defaultdict

from pydantic import Field

import loop


def group_by_prompt(candidates, scores) -> dict[object, list[loop.Candidate]]:
    """Scored candidates by prompt, in first-seen order (key: prompt id, else the object)."""
    groups: dict[object, list[loop.Candidate]] = defaultdict(list)
    for c in candidates:
        key = c.prompt.id if c.prompt.id is not None else id(c.prompt)
        groups[key]  # a prompt without scored candidates still counts (as skipped)
        if c.id is not None and c.id in scores:
            groups[key].append(c)
    return groups


def best_first(group: list[loop.Candidate], scores: dict[int, float]) -> list[loop.Candidate]:
    """Highest score first; among equal scores the shorter text, then the lower id.

    Preferring the shorter of equally scored answers (and, read from the end, rejecting
    the longer) works against the length growth judges reward (Yuan et al. 2024, sec. 3).
    """
    return sorted(group, key=lambda c: (-scores[c.id], len(c.text), c.id))


class PairSelector(loop.Selector):
    """Max-vs-min pairs per prompt, plus the pairs judges offer (revisions).

    Per prompt with at least two scored candidates: chosen is the first of
    ``best_first`` (highest score; ties -> shorter text, then lower id), rejected the
    last (lowest score; ties -> longer text, then higher id). The pair is kept only when
    its margin is above ``min_margin``, so equal scores never make a pair.

    Offered pairs (``use_offered``) are kept as the judge made them, with missing scores
    filled in from ``scores``; one whose margin is known and not above ``min_margin`` is
    dropped, and one equal to a pair already selected is not added twice.

    Metrics: ``select/pairs`` (all pairs returned), ``select/offered_pairs``,
    ``select/skipped_prompts`` (prompts that gave no max-vs-min pair: too few scored
    candidates, or margin too small) and ``select/mean_margin`` (over the returned pairs
    whose margin is known; absent when there is none).
    """

    name = "pairs"

    class Options(loop.Selector.Options):
        # A pair needs chosen - rejected > min_margin: raise it to train only on clear wins.
        min_margin: float = Field(0.0, ge=0.0)
        # Also train on pairs judges offer (a critique's revision preferred to its original).
        use_offered: bool = True

    def select(self, ctx, candidates, scores, offered) -> loop.Selection:
        opts = self.options
        pairs: list[loop.Pair] = []
        skipped = 0
        for group in group_by_prompt(candidates, scores).values():
            if len(group) < 2:
                skipped += 1
                continue
            ranked = best_first(group, scores)
            chosen, rejected = ranked[0], ranked[-1]
            if scores[chosen.id] - scores[rejected.id] <= opts.min_margin:
                skipped += 1
                continue
            pairs.append(
                loop.Pair(
                    prompt=chosen.prompt,
                    chosen=chosen,
                    rejected=rejected,
                    chosen_score=scores[chosen.id],
                    rejected_score=scores[rejected.id],
                    source="selector",
                )
            )
        taken = 0
        if opts.use_offered:
            seen = {(id(p.chosen), id(p.rejected)) for p in pairs}
            for pair in offered:
                pair = _with_scores(pair, scores)
                if pair.margin is not None and pair.margin <= opts.min_margin:
                    continue
                if (id(pair.chosen), id(pair.rejected)) in seen:
                    continue
                seen.add((id(pair.chosen), id(pair.rejected)))
                pairs.append(pair)
                taken += 1
        metrics = {
            "select/pairs": float(len(pairs)),
            "select/offered_pairs": float(taken),
            "select/skipped_prompts": float(skipped),
        }
        margins = [p.margin for p in pairs if p.margin is not None]
        if margins:
            metrics["select/mean_margin"] = sum(margins) / len(margins)
        return loop.Selection(pairs=pairs, metrics=metrics)


def _with_scores(pair: loop.Pair, scores: dict[int, float]) -> loop.Pair:
    if pair.chosen_score is None and pair.chosen.id in scores:
        pair.chosen_score = scores[pair.chosen.id]
    if pair.rejected_score is None and pair.rejected.id in scores:
        pair.rejected_score = scores[pair.rejected.id]
    return pair


@loop.hookimpl
def register_selectors(register):
    register(PairSelector)
