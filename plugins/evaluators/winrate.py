"""``winrate``: the round's policy against a fixed reference on held-out prompts, judged
pairwise by a judge that is not the policy being trained.

    [[evaluators]]
    name = "winrate"
    heldout = 100                  # or path = "heldout.jsonl"
    reference = "base"             # or "previous": the round before
    judge = { name = "self_reward", adapter = "base" }   # any judge, with its options

Per round (round 0 included):

1. The policy and the reference answer every held-out prompt (greedy unless
   ``temperature`` is set). Identical answers are ties without asking the judge, so round 0
   against the base is 0.5 by construction.
2. Every other pair is judged in both orders: the judge scores [policy, reference] in one
   call and [reference, policy] in another (a pairwise judge such as
   ``constitutional_preference`` sees the two orders; a pointwise one scores each answer
   twice). In each order the higher score wins, equal scores tie (half a win); an order
   with an unparsed score is left out; a pair's outcome is the mean of its orders.
3. ``eval/<label>/winrate`` is the mean outcome over pairs (ties count half), with a 95%
   Wilson score interval (``winrate_low``, ``winrate_high``; n = pairs with an outcome);
   ``eval/<label>/lc_winrate`` is the length-controlled win rate: a logistic regression
   of the outcome on the answer-length difference, read at zero difference (AlpacaEval 2
   LC, Dubois et al. 2024, eq. 1 without the instruction-difficulty term; see ``lc_winrate``).

Other metrics: ``policy_tokens`` / ``reference_tokens`` (mean lengths), ``position_bias``
(the share of orders won by the answer shown first, minus one half), ``pairs``, ``ties``
(identical answers) and ``judge_failures`` (orders without two valid scores).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import loop
from loop.config import ComponentSpec
from loop.guards import check_judge
from plugins.evaluators import heldout

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def order_outcome(policy_score: float | None, reference_score: float | None) -> float | None:
    """1 (policy wins), 0.5 (tie) or 0 (loss) in one order; None when a score is missing."""
    if policy_score is None or reference_score is None:
        return None
    return 1.0 if policy_score > reference_score else 0.5 if policy_score == reference_score else 0.0


def pair_outcome(orders: list[float | None]) -> float | None:
    """The mean of a pair's valid order outcomes (None: no order could be judged)."""
    valid = [o for o in orders if o is not None]
    return sum(valid) / len(valid) if valid else None


def position_bias(policy_first: list[float | None], reference_first: list[float | None]) -> float | None:
    """Share of orders won by the answer shown first, minus 1/2 (0: no position bias).

    ``policy_first`` holds the policy's outcomes when it was shown first, ``reference_first``
    its outcomes when the reference was shown first (the first answer then won 1 - outcome).
    """
    firsts = [o for o in policy_first if o is not None]
    firsts += [1.0 - o for o in reference_first if o is not None]
    return sum(firsts) / len(firsts) - 0.5 if firsts else None


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``p`` over ``n`` trials (ties as halves).

    (Wilson 1927): centre (p + z^2/2n) / (1 + z^2/n), half-width
    z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n). Unlike the normal interval it stays inside
    [0, 1] and is not zero-width at p = 0 or 1.
    """
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def lc_winrate(outcomes: list[float], length_diffs: list[float], l2: float = 1e-3,
               steps: int = 50) -> float:
    """The length-controlled win rate (AlpacaEval 2 LC, Dubois et al. 2024, eq. 1).

    Fit P(policy wins) = sigmoid(a + b * tanh(d / s)) to the outcomes y in [0, 1] (ties
    0.5) by logistic regression (cross-entropy, soft labels), where d is the policy's
    answer length minus the reference's and s the standard deviation of d, as AlpacaEval
    does; then return sigmoid(a): the win rate predicted at zero length difference. A small
    L2 penalty ``l2`` on (a, b) keeps the fit finite when one side always wins. Newton's
    method on the two parameters (a convex problem). With no length difference at all it is
    the plain win rate, up to the penalty.
    """
    n = len(outcomes)
    if n == 0:
        raise ValueError("lc_winrate needs at least one outcome")
    mean = sum(length_diffs) / n
    s = math.sqrt(sum((d - mean) ** 2 for d in length_diffs) / n)
    xs = [math.tanh(d / s) if s > 0 else 0.0 for d in length_diffs]
    a = b = 0.0
    for _ in range(steps):
        ga, gb = l2 * a, l2 * b
        haa, hab, hbb = l2, 0.0, l2
        for x, y in zip(xs, outcomes):
            p = _sigmoid(a + b * x)
            w = p * (1 - p)
            ga += (p - y) / n
            gb += (p - y) * x / n
            haa += w / n
            hab += w * x / n
            hbb += w * x * x / n
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da = (hbb * ga - hab * gb) / det
        db = (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if abs(da) + abs(db) < 1e-10:
            break
    return _sigmoid(a)


class WinrateEvaluator(loop.Evaluator):
    name = "winrate"

    class Options(heldout.HeldoutOptions):
        # What the policy is compared with: the starting weights, or the round before.
        reference: Literal["base", "previous"] = "base"
        # The judge: {name = ..., its options}; any registered judge. Default: the rubric
        # judged by the base weights (a frozen judge, not the policy being trained).
        judge: dict[str, Any] = {"name": "self_reward", "adapter": "base"}

    def __init__(self, options=None, *, label=None):
        super().__init__(options, label=label)
        from loop import plugins

        spec = ComponentSpec(**self.options.judge)
        self.judge = plugins.build_component("judge", spec, f"evaluators.{self.label}.judge",
                                             label=f"{self.label}-judge")
        self._reference_cache: dict[str | None, list[loop.Completion]] = {}

    def heldout_request(self):
        return heldout.request(self.options, self.label)

    def setup(self, ctx) -> None:
        self.judge.setup(ctx)

    def close(self) -> None:
        self.judge.close()

    def _reference_adapter(self, ctx) -> str | None:
        if self.options.reference == "base" or ctx.round <= 1:
            return None  # round 0's and round 1's "previous" policy is the base model
        row = ctx.store.round_row(ctx.round - 1)
        adapter = row["adapter"] if row else None
        return str(Path(ctx.run_dir) / adapter) if adapter else None

    def evaluate(self, ctx) -> dict[str, float]:
        prompts = self.heldout
        o = self.options
        ours = heldout.answer(ctx, prompts, o, ctx.adapter, self.label)
        ref_adapter = self._reference_adapter(ctx)
        if ref_adapter is None and o.temperature == 0:  # the base answers never change
            if None not in self._reference_cache:
                self._reference_cache[None] = heldout.answer(ctx, prompts, o, None, self.label)
            theirs = self._reference_cache[None]
        else:
            theirs = heldout.answer(ctx, prompts, o, ref_adapter, self.label + "-reference")
        judged = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a.text.strip() != b.text.strip()]
        first: list[float | None] = []  # policy shown first
        second: list[float | None] = []  # reference shown first
        if judged:
            first, second = self._judge_both_orders(ctx, prompts, ours, theirs, judged)
        outcomes: list[float] = []
        diffs: list[float] = []
        failures = sum(o1 is None for o1 in first) + sum(o2 is None for o2 in second)
        by_index = {i: pair_outcome([f, s]) for i, f, s in zip(judged, first, second)}
        for i in range(len(prompts)):
            out = by_index.get(i, 0.5)  # identical answers: a tie
            if out is None:
                continue
            outcomes.append(out)
            diffs.append(float(ours[i].num_tokens - theirs[i].num_tokens))
        key = f"eval/{self.label}"
        metrics = {
            f"{key}/pairs": float(len(outcomes)),
            f"{key}/ties": float(len(prompts) - len(judged)),
            f"{key}/judge_failures": float(failures),
            f"{key}/policy_tokens": sum(a.num_tokens for a in ours) / len(ours),
            f"{key}/reference_tokens": sum(b.num_tokens for b in theirs) / len(theirs),
        }
        if outcomes:
            rate = sum(outcomes) / len(outcomes)
            low, high = wilson(rate, len(outcomes))
            metrics.update({f"{key}/winrate": rate, f"{key}/winrate_low": low,
                            f"{key}/winrate_high": high,
                            f"{key}/lc_winrate": lc_winrate(outcomes, diffs)})
        bias = position_bias(first, second)
        if bias is not None:
            metrics[f"{key}/position_bias"] = bias
        return metrics

    def _judge_both_orders(self, ctx, prompts, ours, theirs, judged):
        """Per judged pair, the policy's outcome with it shown first, and shown second."""
        outcomes: list[list[float | None]] = []
        all_judgments = []
        outputs = truncated = 0
        sample = None
        for policy_first in (True, False):
            cands, pairs = [], []
            for i in judged:
                pol = loop.Candidate(prompt=prompts[i], text=ours[i].text, policy=ctx.policy_label,
                                     num_tokens=ours[i].num_tokens, source="eval")
                ref = loop.Candidate(prompt=prompts[i], text=theirs[i].text, policy="reference",
                                     num_tokens=theirs[i].num_tokens, source="eval")
                cands += [pol, ref] if policy_first else [ref, pol]
                pairs.append((pol, ref))
            result = self.judge.judge(ctx, cands)
            all_judgments += result.judgments
            outputs, truncated = outputs + result.outputs, truncated + result.truncated
            sample = sample if sample is not None else result.truncated_sample
            scores: dict[int, list[float]] = {}
            for j in result.judgments:
                if j.score is not None:
                    scores.setdefault(id(j.candidate), []).append(j.score)
            mean = {k: sum(v) / len(v) for k, v in scores.items()}
            outcomes.append([order_outcome(mean.get(id(p)), mean.get(id(r))) for p, r in pairs])
        index = next(i for i, e in enumerate(ctx.config.evaluators) if (e.label or e.name) == self.label) \
            if hasattr(ctx.config, "evaluators") else 0
        guards = getattr(ctx.config, "guards", None)
        if guards is not None:
            check_judge(guards, field=f"evaluators[{index}].judge", judge=self.judge,
                        judgments=all_judgments, outputs=outputs, truncated=truncated,
                        round=ctx.round, run_dir=ctx.run_dir, phase="evaluate", truncated_sample=sample)
        return outcomes[0], outcomes[1]


@loop.hookimpl
def register_evaluators(register):
    register(WinrateEvaluator)
