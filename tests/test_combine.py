"""[selection] combine (loop/combine.py) on hand-built judgments: normalisation per judge,
the weighted mean, and the eligibility rule (a candidate missing a judge of its prompt's
panel is never compared)."""

from __future__ import annotations

import pytest

from loop.combine import combine


def rows(table):
    """{candidate: (prompt, {judge: [scores]})} -> judgment rows."""
    return [(cid, prompt, judge, s) for cid, (prompt, by) in table.items()
            for judge, scores in by.items() for s in scores]


# The case the issue measured: a and b both rated [3, 5] by the rubric; only a met the
# pairwise judge. Today's rule made that a "pair" (4.0 vs 2.83).
ISSUE = {
    "a": ("p", {"rubric": [3, 5], "pref": [0.5]}),
    "b": ("p", {"rubric": [3, 5]}),
    "c": ("p", {"rubric": [1, 2], "pref": [0.25]}),
}


def test_a_candidate_missing_a_panel_judge_is_not_compared():
    scores, ineligible = combine(rows(ISSUE), {"rubric": 1.0, "pref": 0.5}, "mean")
    assert ineligible == {"b"} and set(scores) == {"a", "c"}
    # the weighted mean over the same two judges for both
    assert scores["a"] == pytest.approx((1.0 * 4.0 + 0.5 * 0.5) / 1.5)
    assert scores["c"] == pytest.approx((1.0 * 1.5 + 0.5 * 0.25) / 1.5)


def test_panels_are_per_prompt():
    table = {"a": ("p", {"rubric": [4]}), "b": ("p", {"rubric": [2]}),
             "c": ("q", {"rubric": [3], "pref": [0.9]}), "d": ("q", {"rubric": [5], "pref": [0.1]})}
    scores, ineligible = combine(rows(table), {}, "mean")
    assert not ineligible
    assert scores == {"a": 4, "b": 2, "c": pytest.approx(1.95), "d": pytest.approx(2.55)}


def test_unparsed_samples_do_not_count_and_all_unparsed_is_absent():
    table = {"a": ("p", {"rubric": [4, None]}), "b": ("p", {"rubric": [None, None]})}
    scores, ineligible = combine(rows(table), {}, "mean")
    assert scores == {"a": 4.0} and not ineligible


def test_zscore_puts_judges_on_one_scale():
    # the rubric spreads 0..5, the pairwise judge 0.4..0.6: raw, the rubric decides alone
    table = {"a": ("p", {"rubric": [5], "pref": [0.4]}), "b": ("p", {"rubric": [0], "pref": [0.6]}),
             "c": ("q", {"rubric": [5], "pref": [0.4]}), "d": ("q", {"rubric": [0], "pref": [0.6]})}
    raw, _ = combine(rows(table), {}, "mean")
    assert raw["a"] > raw["b"]
    z, _ = combine(rows(table), {}, "zscore")
    # each judge has mean 0 and sd 1 over the round: a = (1 + -1) / 2 = 0 = b
    assert z["a"] == pytest.approx(0.0) and z["b"] == pytest.approx(0.0)
    z2, _ = combine(rows(table), {"pref": 3.0}, "zscore")
    assert z2["b"] == pytest.approx((-1 + 3 * 1) / 4) and z2["a"] == pytest.approx((1 - 3) / 4)


def test_zscore_of_a_constant_judge_is_zero():
    table = {"a": ("p", {"rubric": [3]}), "b": ("p", {"rubric": [3]})}
    assert combine(rows(table), {}, "zscore")[0] == {"a": 0.0, "b": 0.0}


def test_rank_within_each_prompt():
    table = {"a": ("p", {"rubric": [5], "rm": [-2.0]}), "b": ("p", {"rubric": [3], "rm": [7.0]}),
             "c": ("p", {"rubric": [3], "rm": [1.0]}), "d": ("q", {"rubric": [0], "rm": [0.0]})}
    scores, _ = combine(rows(table), {}, "rank")
    # rubric ranks in p: a 1.0, b and c tied at 0.25; rm ranks: b 1.0, c 0.5, a 0.0
    assert scores["a"] == pytest.approx(0.5)
    assert scores["b"] == pytest.approx(0.625)
    assert scores["c"] == pytest.approx(0.375)
    assert scores["d"] == 0.5  # alone in its prompt


def test_unknown_method():
    with pytest.raises(ValueError, match="zscore"):
        combine([], {}, "median")
