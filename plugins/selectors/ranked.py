"""Ranked lists (RRHF, PRO) and unpaired labels (KTO) from the judgments.

Config::

    [selector]
    name = "ranked"        # every scored candidate of a prompt, rank 0 = best
    min_candidates = 2

    [selector]
    name = "labels"        # or "kto"
    mode = "best_worst"    # per prompt: best -> desirable, worst -> undesirable
    # mode = "threshold"; desirable_above = 4.0; undesirable_below = 2.0
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

import loop
from plugins.selectors.pairs import best_first, group_by_prompt


class RankedSelector(loop.Selector):
    """Each prompt's scored candidates as one ranked list: label "ranked", rank 0 the
    best (``best_first``: score, then shorter text, then lower id), group the prompt id.

    A prompt is kept when it has at least ``min_candidates`` scored candidates and its
    scores are not all equal (a list of ties teaches no ranking).

    Metrics: ``select/selected``, ``select/groups``, ``select/skipped_prompts``.
    """

    name = "ranked"

    class Options(loop.Selector.Options):
        # Shortest list worth ranking (a single answer has no order).
        min_candidates: int = Field(2, ge=2)
        # If set, keep only this many per prompt: the best and the worst first.
        max_candidates: int | None = Field(None, ge=2)

    def select(self, ctx, candidates, scores, offered) -> loop.Selection:
        opts = self.options
        selected: list[loop.Selected] = []
        groups = skipped = 0
        for group in group_by_prompt(candidates, scores).values():
            ranked = best_first(group, scores)
            if len(ranked) < opts.min_candidates or len({scores[c.id] for c in ranked}) < 2:
                skipped += 1
                continue
            if opts.max_candidates is not None and len(ranked) > opts.max_candidates:
                m = opts.max_candidates
                ranked = ranked[: m - 1] + ranked[-1:]  # keep the worst, the best m-1
            groups += 1
            selected += [
                loop.Selected(
                    candidate=c, score=scores[c.id], rank=r, label="ranked", group=c.prompt.id
                )
                for r, c in enumerate(ranked)
            ]
        return loop.Selection(
            selected=selected,
            metrics={
                "select/selected": float(len(selected)),
                "select/groups": float(groups),
                "select/skipped_prompts": float(skipped),
            },
        )


class LabelSelector(loop.Selector):
    """Unpaired labelled answers for KTO: "desirable" or "undesirable".

    ``best_worst``: per prompt with two or more scored candidates and unequal scores, the
    best (``best_first``) is desirable and the worst undesirable. ``threshold``: every
    scored candidate with score >= ``desirable_above`` is desirable, <= ``undesirable_below``
    undesirable, the rest are dropped. ``rank`` is the place in its prompt's order.

    Metrics: ``select/desirable``, ``select/undesirable``, ``select/skipped_prompts``.
    """

    name = "labels"

    class Options(loop.Selector.Options):
        # How to label: per-prompt extremes, or absolute score thresholds.
        mode: Literal["best_worst", "threshold"] = "best_worst"
        # threshold mode: a score at or above this is desirable.
        desirable_above: float | None = None
        # threshold mode: a score at or below this is undesirable.
        undesirable_below: float | None = None

        @model_validator(mode="after")
        def _thresholds(self):
            if self.mode == "threshold":
                if self.desirable_above is None or self.undesirable_below is None:
                    raise ValueError(
                        "mode = \"threshold\" needs desirable_above and undesirable_below "
                        "(e.g. desirable_above = 4.0, undesirable_below = 2.0)"
                    )
                if self.undesirable_below >= self.desirable_above:
                    raise ValueError("undesirable_below must be below desirable_above")
            elif self.desirable_above is not None or self.undesirable_below is not None:
                raise ValueError("desirable_above / undesirable_below need mode = \"threshold\"")
            return self

    def select(self, ctx, candidates, scores, offered) -> loop.Selection:
        opts = self.options
        high, low = opts.desirable_above, opts.undesirable_below
        selected: list[loop.Selected] = []
        skipped = 0
        for group in group_by_prompt(candidates, scores).values():
            ranked = best_first(group, scores)
            if opts.mode == "best_worst":
                if len(ranked) < 2 or scores[ranked[0].id] == scores[ranked[-1].id]:
                    skipped += 1
                    continue
                last = len(ranked) - 1
                labelled = [(0, ranked[0], "desirable"), (last, ranked[-1], "undesirable")]
            else:
                labelled = [
                    (r, c, "desirable" if scores[c.id] >= high else "undesirable")
                    for r, c in enumerate(ranked)
                    if scores[c.id] >= high or scores[c.id] <= low
                ]
                if not labelled:
                    skipped += 1
            selected += [
                loop.Selected(candidate=c, score=scores[c.id], rank=r, label=lab, group=c.prompt.id)
                for r, c, lab in labelled
            ]
        return loop.Selection(
            selected=selected,
            metrics={
                "select/desirable": float(sum(s.label == "desirable" for s in selected)),
                "select/undesirable": float(sum(s.label == "undesirable" for s in selected)),
                "select/skipped_prompts": float(skipped),
            },
        )


class KTOSelector(LabelSelector):
    """``labels`` under the name of the updater it feeds."""

    name = "kto"


@loop.hookimpl
def register_selectors(register):
    register(RankedSelector)
    register(LabelSelector)
    register(KTOSelector)
