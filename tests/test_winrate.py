"""Win-rate arithmetic (both orders, ties, position bias), the length-controlled win rate on
hand-built data, the Wilson interval, and the evaluator on fixed judge outputs."""

from __future__ import annotations

import math
import types

import pytest

import loop
from loop.guards import GuardsConfig
from plugins.evaluators.winrate import (
    WinrateEvaluator,
    lc_winrate,
    order_outcome,
    pair_outcome,
    position_bias,
    wilson,
)


def test_order_and_pair_outcomes():
    assert order_outcome(4, 3) == 1.0 and order_outcome(3, 3) == 0.5 and order_outcome(2, 3) == 0.0
    assert order_outcome(None, 3) is None
    # Both orders agree, disagree (a position-biased judge), or one order unparsed.
    assert pair_outcome([1.0, 1.0]) == 1.0
    assert pair_outcome([1.0, 0.0]) == 0.5
    assert pair_outcome([None, 0.5]) == 0.5
    assert pair_outcome([None, None]) is None


def test_position_bias():
    # A judge that always prefers the first answer: the policy wins when first, loses when second.
    assert position_bias([1.0, 1.0], [0.0, 0.0]) == 0.5
    assert position_bias([0.0], [1.0]) == -0.5  # always the second
    assert position_bias([1.0, 0.5], [1.0, 0.5]) == 0.0  # consistent judgments: no bias
    assert position_bias([None], [None]) is None


def test_wilson_interval():
    low, high = wilson(0.5, 100)
    # By hand: centre 0.5, half-width 1.96*sqrt(0.25/100 + 1.96^2/40000)/(1 + 1.96^2/100)
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook values
    low, high = wilson(1.0, 10)  # never zero-width, stays inside [0, 1]
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + z * z))
    assert wilson(0.0, 0) == (0.0, 1.0)


def test_lc_winrate_removes_the_length_effect():
    # Longer answers win 90%, equal-length ones 50%, shorter ones 10%; the policy's answers
    # are longer more often, so its raw win rate is 0.6, but at equal length it is 0.5.
    outcomes, diffs = [], []
    for diff, n, wins in ((+5, 20, 18), (0, 10, 5), (-5, 10, 1)):
        outcomes += [1.0] * wins + [0.0] * (n - wins)
        diffs += [float(diff)] * n
    assert sum(outcomes) / len(outcomes) == 0.6
    assert lc_winrate(outcomes, diffs) == pytest.approx(0.5, abs=0.01)


def test_lc_winrate_without_length_differences_is_the_win_rate():
    outcomes = [1.0, 1.0, 0.5, 0.0, 1.0]
    assert lc_winrate(outcomes, [0.0] * 5) == pytest.approx(0.7, abs=0.002)
    # One side always wins: the penalty keeps the fit finite, the answer near 1.
    assert 0.95 < lc_winrate([1.0] * 8, [1.0, -1.0] * 4) < 1.0


class ScriptedJudge(loop.Judge):
    """Scores from a table keyed by answer text; "first" adds a bonus to whoever is first."""

    name = "scripted"

    def __init__(self, table, first_bonus=0.0):
        super().__init__(label="scripted")
        self.table, self.first_bonus = table, first_bonus

    def judge(self, ctx, candidates):
        out, seen = [], set()
        for c in candidates:
            key = id(c.prompt)
            bonus = self.first_bonus if key not in seen else 0.0
            seen.add(key)
            score = self.table.get(c.text)
            out.append(loop.Judgment(candidate=c, score=None if score is None else score + bonus,
                                     raw="Score: ?"))
        return loop.JudgeResult(judgments=out)


class ScriptedGenerator(loop.Generator):
    name = "scripted-gen"

    def __init__(self, answers):
        super().__init__()
        self.answers = answers  # adapter -> list of texts

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        return [[loop.Completion(text=t, num_tokens=len(t.split()), finish_reason="stop")]
                for t in self.answers[adapter][: len(chats)]]


def _evaluate(policy, base, table, first_bonus=0.0):
    ev = WinrateEvaluator(WinrateEvaluator.Options(heldout=4), label="wr")
    ev.judge = ScriptedJudge(table, first_bonus)
    ev.heldout = [loop.Prompt(text=f"q{i}") for i in range(len(policy))]
    gen = ScriptedGenerator({"A": policy, None: base})
    ctx = types.SimpleNamespace(
        generator=gen, adapter="A", round=1, policy_label="round-1", run_dir=".",
        config=types.SimpleNamespace(evaluators=[types.SimpleNamespace(label="wr", name="winrate")],
                                     guards=GuardsConfig()),
        derive_seed=lambda *a: 0, chat=lambda text: [{"role": "user", "content": text}])
    return ev.evaluate(ctx)


def test_evaluator_on_fixed_judge_outputs():
    policy = ["good", "same", "bad", "good long answer"]
    base = ["bad", "same", "good", "ok"]
    table = {"good": 5, "bad": 1, "ok": 5, "good long answer": 5}
    m = _evaluate(policy, base, table)
    # win, tie (identical: never judged), loss, tie (equal scores) -> (1 + .5 + 0 + .5) / 4
    assert m["eval/wr/winrate"] == 0.5 and m["eval/wr/ties"] == 1 and m["eval/wr/pairs"] == 4
    assert m["eval/wr/position_bias"] == 0.0 and m["eval/wr/judge_failures"] == 0
    assert m["eval/wr/policy_tokens"] == pytest.approx(6 / 4) and m["eval/wr/reference_tokens"] == 1.0
    assert m["eval/wr/winrate_low"] < 0.5 < m["eval/wr/winrate_high"]
    # A judge that favours the first answer by 10 points: every judged order is won by
    # whoever is first, so each judged pair is half won; the bias shows.
    m = _evaluate(policy, base, table, first_bonus=10)
    assert m["eval/wr/winrate"] == 0.5 and m["eval/wr/position_bias"] == 0.5


def test_unparsed_orders_are_left_out_and_guarded():
    policy, base = ["a", "b", "c"], ["x", "y", "z"]
    table = {"a": 5, "x": 1, "b": 5, "y": 1, "c": 5}  # "z" never parses
    m = _evaluate(policy, base, table)
    assert m["eval/wr/winrate"] == 1.0 and m["eval/wr/pairs"] == 2 and m["eval/wr/judge_failures"] == 2
    with pytest.raises(loop.UserError, match=r"evaluators\[0\]\.judge.*could not parse 12 of 12"):
        _evaluate(policy, base, {})
