"""The ranked and labels (kto) selectors."""

from __future__ import annotations

import pytest

import loop
from plugins.selectors.ranked import KTOSelector, LabelSelector, RankedSelector

from conftest import make_context


def cands(prompt, texts, start_id):
    return [loop.Candidate(prompt=prompt, text=t, id=start_id + i) for i, t in enumerate(texts)]


@pytest.fixture
def world():
    p1, p2, p3, p4 = (loop.Prompt(text=f"p{i}", id=i) for i in range(1, 5))
    c1 = cands(p1, ["a", "bb", "ccc"], 10)  # clear order 11 > 10 > 12
    c2 = cands(p2, ["x", "yy"], 20)  # a tie: no order
    c3 = cands(p3, ["only", "unscored"], 30)  # one scored candidate
    c4 = cands(p4, ["long best", "best", "worst", "longer worst"], 40)  # ties at both ends
    scores = {10: 3.0, 11: 5.0, 12: 1.0, 20: 2.0, 21: 2.0, 30: 4.0, 40: 5.0, 41: 5.0, 42: 0.0, 43: 0.0}
    return c1 + c2 + c3 + c4, scores


def test_ranked_lists_per_prompt(world):
    candidates, scores = world
    sel = RankedSelector().select(make_context(), candidates, scores, [])
    got = [(s.group, s.candidate.id, s.rank, s.label, s.score) for s in sel.selected]
    assert got == [
        (1, 11, 0, "ranked", 5.0), (1, 10, 1, "ranked", 3.0), (1, 12, 2, "ranked", 1.0),
        (4, 41, 0, "ranked", 5.0), (4, 40, 1, "ranked", 5.0), (4, 42, 2, "ranked", 0.0), (4, 43, 3, "ranked", 0.0),
    ]
    assert sel.metrics == {"select/selected": 7.0, "select/groups": 2.0, "select/skipped_prompts": 2.0}
    short = RankedSelector(RankedSelector.Options(max_candidates=2)).select(make_context(), candidates, scores, [])
    assert [s.candidate.id for s in short.selected] == [11, 12, 41, 43]


def test_labels_best_worst(world):
    candidates, scores = world
    sel = LabelSelector().select(make_context(), candidates, scores, [])
    got = [(s.candidate.id, s.label, s.rank) for s in sel.selected]
    assert got == [(11, "desirable", 0), (12, "undesirable", 2), (41, "desirable", 0), (43, "undesirable", 3)]
    assert sel.metrics == {"select/desirable": 2.0, "select/undesirable": 2.0, "select/skipped_prompts": 2.0}
    assert KTOSelector.name == "kto" and issubclass(KTOSelector, LabelSelector)


def test_labels_threshold(world):
    candidates, scores = world
    opts = LabelSelector.Options(mode="threshold", desirable_above=4.0, undesirable_below=1.0)
    sel = LabelSelector(opts).select(make_context(), candidates, scores, [])
    got = sorted((s.candidate.id, s.label) for s in sel.selected)
    assert got == [(11, "desirable"), (12, "undesirable"), (30, "desirable"), (40, "desirable"),
                   (41, "desirable"), (42, "undesirable"), (43, "undesirable")]
    assert sel.metrics["select/skipped_prompts"] == 1.0  # p2: both 2.0


def test_labels_options_say_how_to_fix():
    with pytest.raises(ValueError, match="desirable_above"):
        LabelSelector.Options(mode="threshold")
    with pytest.raises(ValueError, match="mode"):
        LabelSelector.Options(desirable_above=3.0)
