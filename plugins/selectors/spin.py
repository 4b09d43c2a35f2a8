"""SPIN: the reference answer is chosen, the current policy's own answer rejected.

Config::

    [selector]
    name = "spin"
    per_prompt = 1          # policy answers paired with each reference answer

    [updater]
    name = "dpo"            # with DPO this is Self-Play Fine-Tuning

Self-Play Fine-Tuning (Chen et al., 2024, "Self-Play Fine-Tuning Converts Weak Language
Models to Strong Language Models", eq. 4.7: the logistic loss on the log-ratio margin of
the human answer ``y`` over the previous iterate's answer ``y'``) is DPO's loss on pairs
(reference answer, policy answer) with the previous round's policy as the reference,
which is what ``dpo`` already does; this selector makes those pairs. No judge is needed
(the judges' scores are ignored), only prompts that carry a reference answer.
"""

from __future__ import annotations

from pydantic import Field

import loop


def reference_answer(prompt: loop.Prompt) -> str | None:
    """The answer a prompt carries (``Prompt.answer``: the dataset's ``answer`` field, the
    tiny world's solution; a rewrite asks its original's question), or None."""
    from plugins.judges.verify import reference

    answer = reference(prompt)
    return answer if isinstance(answer, str) and answer.strip() else None


class SpinSelector(loop.Selector):
    """Per prompt with a reference answer: pairs (reference, a policy answer).

    The reference answer becomes a candidate of its own (``source = "reference"``,
    ``policy = "reference"``), stored with the pairs; up to ``per_prompt`` of the
    policy's sampled answers (in sample order) are the rejected sides. Answers that
    equal the reference (whitespace aside) are skipped: a pair of one text teaches
    nothing. Metrics: ``select/pairs``, ``spin/prompts_without_answer``,
    ``spin/matching_reference`` (the share of policy answers equal to the reference).
    """

    name = "spin"

    class Options(loop.Selector.Options):
        # Policy answers paired with each prompt's reference answer.
        per_prompt: int = Field(1, ge=1)

    def select(self, ctx, candidates, scores, offered) -> loop.Selection:
        by_prompt: dict[int, list[loop.Candidate]] = {}
        for cand in candidates:
            if cand.source == "policy":
                by_prompt.setdefault(id(cand.prompt), []).append(cand)
        pairs: list[loop.Pair] = []
        missing = matching = total = 0
        for group in by_prompt.values():
            prompt = group[0].prompt
            answer = reference_answer(prompt)
            if answer is None:
                missing += 1
                continue
            reference = loop.Candidate(prompt=prompt, text=answer, policy="reference",
                                       source="reference", num_tokens=None)
            taken = 0
            for cand in sorted(group, key=lambda x: (x.sample_index, x.id or 0)):
                total += 1
                if cand.text.strip() == answer.strip():
                    matching += 1
                    continue
                if taken < self.options.per_prompt:
                    pairs.append(loop.Pair(prompt=prompt, chosen=reference, rejected=cand,
                                           source="spin"))
                    taken += 1
        if not pairs and missing == len(by_prompt):
            raise loop.UserError(
                "spin selector: no prompt carries a reference answer; give prompts an "
                "\"answer\" field (JSONL: {\"prompt\": ..., \"answer\": ...})"
            )
        return loop.Selection(pairs=pairs, metrics={
            "select/pairs": float(len(pairs)),
            "spin/prompts_without_answer": float(missing),
            "spin/matching_reference": matching / max(total, 1),
        })


@loop.hookimpl
def register_selectors(register):
    register(SpinSelector)
