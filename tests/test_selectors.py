"""The pairs and top_k selectors."""

from __future__ import annotations

import random

import pytest

import loop
from plugins.selectors.pairs import PairSelector
from plugins.selectors.top_k import TopKSelector

from conftest import make_context


def cands(prompt, texts, start_id):
    return [loop.Candidate(prompt=prompt, text=t, id=start_id + i) for i, t in enumerate(texts)]


@pytest.fixture
def world():
    p1, p2, p3, p4 = (loop.Prompt(text=f"p{i}", id=i) for i in range(1, 5))
    c1 = cands(p1, ["a", "bb", "ccc"], 10)  # clear best and worst
    c2 = cands(p2, ["x", "yy"], 20)  # a tie: no pair
    c3 = cands(p3, ["only", "unscored"], 30)  # one scored candidate: skipped
    c4 = cands(p4, ["long best", "best", "worst", "longer worst"], 40)  # ties at both ends
    scores = {10: 3.0, 11: 5.0, 12: 1.0, 20: 2.0, 21: 2.0, 30: 4.0, 40: 5.0, 41: 5.0, 42: 0.0, 43: 0.0}
    return c1 + c2 + c3 + c4, scores


def test_pairs_max_vs_min_ties_dropped(world):
    candidates, scores = world
    sel = PairSelector().select(make_context(), candidates, scores, [])
    got = [(p.prompt.id, p.chosen.id, p.rejected.id, p.margin) for p in sel.pairs]
    # p4: equal best -> the shorter ("best"), equal worst -> the longer ("longer worst")
    assert got == [(1, 11, 12, 4.0), (4, 41, 43, 5.0)]
    assert all(p.source == "selector" for p in sel.pairs)
    assert sel.metrics == {
        "select/pairs": 2.0,
        "select/offered_pairs": 0.0,
        "select/skipped_prompts": 2.0,
        "select/mean_margin": 4.5,
    }


def test_pairs_do_not_depend_on_candidate_order(world):
    candidates, scores = world
    expected = [(p.chosen.id, p.rejected.id) for p in PairSelector().select(make_context(), candidates, scores, []).pairs]
    for seed in range(5):
        shuffled = candidates[:]
        random.Random(seed).shuffle(shuffled)
        got = PairSelector().select(make_context(), shuffled, scores, []).pairs
        assert sorted((p.chosen.id, p.rejected.id) for p in got) == sorted(expected)


def test_pairs_min_margin_is_strict(world):
    candidates, scores = world
    sel = PairSelector(PairSelector.Options(min_margin=4.0)).select(make_context(), candidates, scores, [])
    assert [(p.chosen.id, p.rejected.id) for p in sel.pairs] == [(41, 43)]
    assert sel.metrics["select/skipped_prompts"] == 3.0


def test_pairs_offered(world):
    candidates, scores = world
    p = candidates[0].prompt
    revision = loop.Candidate(prompt=p, text="revised", source="revision")  # not stored yet: no id
    offered = [
        loop.Pair(prompt=p, chosen=revision, rejected=candidates[2], source="critique"),
        loop.Pair(prompt=p, chosen=candidates[0], rejected=candidates[2], source="critique"),  # margin 2
        loop.Pair(prompt=p, chosen=candidates[3], rejected=candidates[4], source="critique"),  # tie: dropped
    ]
    sel = PairSelector().select(make_context(), candidates, scores, offered)
    extra = sel.pairs[2:]
    assert [(x.chosen.text, x.rejected.id, x.source) for x in extra] == [("revised", 12, "critique"), ("a", 12, "critique")]
    assert extra[0].margin is None and extra[1].margin == 2.0
    assert sel.metrics["select/offered_pairs"] == 2.0
    assert sel.metrics["select/mean_margin"] == pytest.approx((4 + 5 + 2) / 3)
    off = PairSelector(PairSelector.Options(use_offered=False)).select(make_context(), candidates, scores, offered)
    assert len(off.pairs) == 2


def test_pairs_nothing_scored():
    p = loop.Prompt(text="p", id=1)
    sel = PairSelector().select(make_context(), cands(p, ["a", "b"], 1), {}, [])
    assert sel.pairs == [] and sel.metrics["select/skipped_prompts"] == 1.0
    assert "select/mean_margin" not in sel.metrics


def test_top_k_per_prompt(world):
    candidates, scores = world
    sel = TopKSelector(TopKSelector.Options(k=2)).select(make_context(), candidates, scores, [])
    got = [(s.group, s.candidate.id, s.rank, s.score, s.label) for s in sel.selected]
    assert got == [
        (1, 11, 0, 5.0, "top"),
        (1, 10, 1, 3.0, "top"),
        (2, 20, 0, 2.0, "top"),  # tie: shorter text first, then lower id
        (2, 21, 1, 2.0, "top"),
        (3, 30, 0, 4.0, "top"),
        (4, 41, 0, 5.0, "top"),  # "best" is shorter than "long best"
        (4, 40, 1, 5.0, "top"),
    ]
    assert sel.pairs == [] and sel.metrics["select/selected"] == 7.0
    one = TopKSelector().select(make_context(), candidates, scores, [])
    assert [s.candidate.id for s in one.selected] == [11, 20, 30, 41]


def test_top_k_fraction_overall(world):
    candidates, scores = world
    sel = TopKSelector(TopKSelector.Options(fraction=0.3)).select(make_context(), candidates, scores, [])
    # 9 scored candidates -> ceil(2.7) = 3: the three 5.0s, shortest text first
    assert [(s.candidate.id, s.rank) for s in sel.selected] == [(11, 0), (41, 0), (40, 1)]
    assert sel.metrics["select/mean_score"] == 5.0


def test_top_k_options_validated():
    with pytest.raises(ValueError):
        TopKSelector.Options(k=0)
    with pytest.raises(ValueError):
        TopKSelector.Options(fraction=1.5)
    with pytest.raises(ValueError):
        PairSelector.Options(min_margin=-1)


def test_registered_through_the_hook():
    from plugins.selectors import pairs, top_k

    got = []
    pairs.register_selectors(got.append)
    top_k.register_selectors(got.append)
    assert got == [PairSelector, TopKSelector]
