"""The spin selector: the reference answer chosen, the policy's own answer rejected."""

from __future__ import annotations

import pytest

import loop
from plugins.selectors.spin import SpinSelector

from conftest import make_context


def test_spin_pairs_the_reference_with_the_policys_answers():
    with_answer = loop.Prompt(text="Sort the letters: c a b", id=1, answer="a b c")
    without = loop.Prompt(text="Say hi.", id=2)
    cands = [loop.Candidate(prompt=with_answer, text=t, sample_index=i, id=10 + i)
             for i, t in enumerate(["a b c", "c b a", "a c b"])]
    cands.append(loop.Candidate(prompt=without, text="hi", id=20))
    sel = SpinSelector(SpinSelector.Options(per_prompt=2)).select(make_context(), cands, {}, [])
    assert [(p.chosen.text, p.rejected.text) for p in sel.pairs] == [("a b c", "c b a"), ("a b c", "a c b")]
    ref = sel.pairs[0].chosen
    assert ref.source == "reference" and ref.id is None and ref is sel.pairs[1].chosen
    assert sel.metrics["spin/prompts_without_answer"] == 1
    assert sel.metrics["spin/matching_reference"] == pytest.approx(1 / 3)


def test_spin_without_any_reference_answer_says_what_to_add():
    p = loop.Prompt(text="Say hi.", id=2)
    with pytest.raises(loop.UserError, match="answer"):
        SpinSelector().select(make_context(), [loop.Candidate(prompt=p, text="hi", id=1)], {}, [])
