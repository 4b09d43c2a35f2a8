"""Top-k sets: the best candidates become supervised training data (RAFT, Dong et al.,
2023: reward-ranked fine-tuning keeps the best of k samples per prompt).

Config::

    [selector]
    name = "top_k"
    k = 1              # best k per prompt ...
    # fraction = 0.25  # ... or, instead, the best quarter of all scored candidates
"""

from __future__ import annotations

import math

from pydantic import Field

import loop
from plugins.selectors.pairs import best_first, group_by_prompt


class TopKSelector(loop.Selector):
    """The best ``k`` scored candidates of each prompt, or the best ``fraction`` overall.

    Ordering is ``best_first``: score, then shorter text, then lower id, so ties are
    decided the same way on every run. ``rank`` is a candidate's place among its
    prompt's scored candidates (0 = best) in both modes; ``group`` is the prompt id.
    In ``fraction`` mode ``ceil(fraction * scored)`` candidates are kept overall.

    Metrics: ``select/selected``, ``select/skipped_prompts`` (no scored candidate),
    ``select/mean_score`` (of the selected; absent when none).
    """

    name = "top_k"

    class Options(loop.Selector.Options):
        # Candidates kept per prompt (RAFT's best-of-k keeps 1).
        k: int = Field(1, ge=1)
        # If set, keep this share of all scored candidates instead (ignores k); 0 < f <= 1.
        fraction: float | None = Field(None, gt=0.0, le=1.0)

    def select(self, ctx, candidates, scores, offered) -> loop.Selection:
        opts = self.options
        ranked_groups = []
        skipped = 0
        for group in group_by_prompt(candidates, scores).values():
            if not group:
                skipped += 1
                continue
            ranked_groups.append(best_first(group, scores))
        ranked = [(rank, c) for group in ranked_groups for rank, c in enumerate(group)]
        if opts.fraction is not None:
            keep = math.ceil(opts.fraction * len(ranked)) if ranked else 0
            ordered = sorted(ranked, key=lambda rc: (-scores[rc[1].id], len(rc[1].text), rc[1].id))
            chosen = ordered[:keep]
        else:
            chosen = [(rank, c) for rank, c in ranked if rank < opts.k]
        selected = [
            loop.Selected(
                candidate=c, score=scores[c.id], rank=rank, label="top", group=c.prompt.id
            )
            for rank, c in chosen
        ]
        metrics = {
            "select/selected": float(len(selected)),
            "select/skipped_prompts": float(skipped),
        }
        if selected:
            metrics["select/mean_score"] = sum(s.score for s in selected) / len(selected)
        return loop.Selection(selected=selected, metrics=metrics)


@loop.hookimpl
def register_selectors(register):
    register(TopKSelector)
