"""tinyworld: the embedded default world of ``selfloop demo``.

A task (sort a few letters), its verifier, and a tiny Llama seed model trained to both
answer and judge (Self-Rewarding Language Models, Yuan et al. 2024, in miniature). It
registers three components, all named ``tinyworld``:

- model builder: builds (or reuses) the seed model folder; options are ``Recipe`` fields;
- prompt source: ``per_round`` prompts from the train split, drawn with ``ctx.rng()``, each
  with its reference answer (``Prompt.answer``, for the ``verify`` judge and evaluator);
  ``split_heldout`` gives the evaluator's fixed held-out split (disjoint by construction);
- evaluator: greedy accuracy on a fixed held-out split, checked by the verifier, which the
  loop itself never sees; plus answer length and the judges' agreement with the verifier.

The judge prompt is ``prompts/tinyworld_judge.j2`` (variables ``prompt`` and ``response``);
the seed model answers it with its checks and a final ``Score: N`` line.
"""

from __future__ import annotations

import logging
from typing import Any

import loop
from plugins.tinyworld import task
from plugins.tinyworld.model import Recipe, build

log = logging.getLogger("selfloop.tinyworld")


class TinyworldBuilder(loop.ModelBuilder):
    """The seed model: a tiny Llama trained on IFT + EFT tinyworld data, cached by recipe."""

    name = "tinyworld"
    Options = Recipe

    def build(self, cache_dir: str) -> str:
        recipe = Recipe.model_validate(self.options.model_dump())
        return build(cache_dir, recipe, log=log.info)


class TinyworldPrompts(loop.PromptSource):
    """Prompts from the tinyworld train split (never the held-out one)."""

    name = "tinyworld"

    class Options(loop.PromptSource.Options):
        per_round: int = 64  # prompts added each round
        # Which held-out prompts an evaluator's `heldout = K` gets: the same seed as the
        # tinyworld evaluator's `heldout_seed`, so both measure the same prompts.
        heldout_seed: int = 1234

    def propose(self, ctx) -> list[loop.Prompt]:
        rng = ctx.rng("tinyworld")
        prompts = []
        for _ in range(self.options.per_round):
            text, info = task.make_prompt(rng, "train")
            prompts.append(loop.Prompt(text=text, source="tinyworld", answer=info.answer,
                                       meta={"letters": list(info.letters)}))
        return prompts

    def split_heldout(self, k: int, seed: int) -> list[loop.Prompt]:
        """The task's held-out split (never drawn by ``propose``, whatever the seed)."""
        return [loop.Prompt(text=text, source="tinyworld", answer=info.answer,
                            meta={"letters": list(info.letters)})
                for text, info in task.heldout_set(k, seed=self.options.heldout_seed)]


class TinyworldEvaluator(loop.Evaluator):
    """Held-out accuracy by the verifier, answer length, and judge/verifier agreement.

    Metrics: ``eval/accuracy`` (greedy answers that verify), ``eval/mean_length``
    (tokens per answer), ``eval/habit_rate`` (greedy answers showing the seed model's
    bad habit), ``judge/verifier_agreement`` (share of this round's parsed judgments
    whose ``score >= agreement_threshold`` matches the verifier) and
    ``judge/verified_judgments`` (how many judgments that share is over), and per judge
    ``judge/<label>/verifier_auc`` (see ``_per_judge_auc``).
    """

    name = "tinyworld"

    class Options(loop.Evaluator.Options):
        heldout: int = 200  # held-out prompts, the same every round
        heldout_seed: int = 1234  # which held-out prompts
        max_new_tokens: int = 16  # enough for the longest right answer and eos
        agreement_threshold: float = 4.5  # a judge score at least this means "right"
        agreement_judge: str | None = None  # only this judge's label (None: every judge)

    def evaluate(self, ctx) -> dict[str, float]:
        if ctx.generator is None:
            raise loop.UserError("the tinyworld evaluator needs a generator")
        heldout = task.heldout_set(self.options.heldout, seed=self.options.heldout_seed)
        chats = [[{"role": "user", "content": text}] for text, _ in heldout]
        sampling = loop.Sampling(n=1, temperature=0.0, max_new_tokens=self.options.max_new_tokens)
        outputs = ctx.generator.generate(ctx, chats, sampling, adapter=ctx.adapter)
        answers = [group[0] for group in outputs]
        n = max(1, len(answers))
        metrics = {
            "eval/accuracy": sum(task.verify(t, a.text) for (t, _), a in zip(heldout, answers)) / n,
            "eval/mean_length": sum(a.num_tokens for a in answers) / n,
            "eval/habit_rate": sum(
                a.text.strip() == task.habit_answer(info) for (_, info), a in zip(heldout, answers)
            ) / n,
        }
        if ctx.round > 0:
            metrics.update(self.judge_agreement(ctx))
        return metrics

    def judge_agreement(self, ctx) -> dict[str, float]:
        """Agreement of this round's stored judgments with the verifier ({} if none)."""
        try:
            prompts = {_get(p, "id"): _get(p, "text") for p in ctx.store.prompts(ctx.round)}
            candidates = {_get(c, "id"): c for c in ctx.store.candidates(ctx.round)}
            judgments = list(ctx.store.judgments(ctx.round))
        except Exception as e:  # the store is optional here: never fail a round over it
            log.warning("tinyworld: cannot read this round's judgments (%s)", e)
            return {}
        metrics = self._per_judge_auc(judgments, candidates, prompts)
        agree = total = 0
        for j in judgments:
            score = _get(j, "score")
            if score is None:  # a parse failure: not a judgment of right or wrong
                continue
            if self.options.agreement_judge and _get(j, "judge") != self.options.agreement_judge:
                continue
            cand = candidates.get(_get(j, "candidate_id"))
            prompt = prompts.get(_get(cand, "prompt_id")) if cand is not None else None
            if prompt is None or task.parse_prompt(prompt) is None:
                continue  # a rewritten or foreign prompt: the verifier cannot check it
            total += 1
            agree += (float(score) >= self.options.agreement_threshold) == task.verify(
                prompt, _get(cand, "text") or ""
            )
        if total == 0:
            return metrics
        return {**metrics, "judge/verifier_agreement": agree / total,
                "judge/verified_judgments": total}

    @staticmethod
    def _per_judge_auc(judgments, candidates, prompts) -> dict[str, float]:
        """Per judge label, ``judge/<label>/verifier_auc``: over (right, wrong) pairs of
        answers to one prompt, the share the judge ranks right above wrong (ties: half).
        Scale-free, so it compares judges with different score ranges."""
        per: dict[str, dict[int, list[float]]] = {}
        for j in judgments:
            if _get(j, "score") is not None:
                per.setdefault(_get(j, "judge"), {}).setdefault(
                    _get(j, "candidate_id"), []).append(float(_get(j, "score")))
        out = {}
        for label, by_cand in per.items():
            groups: dict[int, tuple[list[float], list[float]]] = {}
            for cid, scores in by_cand.items():
                cand = candidates.get(cid)
                prompt = prompts.get(_get(cand, "prompt_id")) if cand is not None else None
                if prompt is None or task.parse_prompt(prompt) is None:
                    continue
                right, wrong = groups.setdefault(_get(cand, "prompt_id"), ([], []))
                (right if task.verify(prompt, _get(cand, "text") or "") else wrong).append(
                    sum(scores) / len(scores))
            wins = pairs = 0.0
            for right, wrong in groups.values():
                for a in right:
                    for b in wrong:
                        pairs += 1
                        wins += 1.0 if a > b else 0.5 if a == b else 0.0
            if pairs:
                out[f"judge/{label}/verifier_auc"] = wins / pairs
        return out


def _get(row: Any, key: str) -> Any:
    """A field of a store row, whether the store returns dicts or objects."""
    if isinstance(row, dict):
        return row.get(key)
    return getattr(row, key, None)


@loop.hookimpl
def register_model_builders(register):
    register(TinyworldBuilder)


@loop.hookimpl
def register_prompt_sources(register):
    register(TinyworldPrompts)


@loop.hookimpl
def register_evaluators(register):
    register(TinyworldEvaluator)
