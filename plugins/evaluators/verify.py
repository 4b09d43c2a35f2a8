"""``verify``: accuracy on held-out prompts that carry a reference answer.

    [[evaluators]]
    name = "verify"
    heldout = 200              # or path = "heldout.jsonl" (rows with `prompt` and `answer`)
    extract = "last_number"    # exact | last_number | boxed | regex (+ pattern), or
    # function = "my_pkg.checks:score"    # (prompt, answer, reference) -> [0, 1]
    max_new_tokens = 256

Each round (round 0 included) the policy answers every held-out prompt (greedy unless
``temperature`` is set) and each answer is checked against its reference with the same
code as the ``verify`` judge (plugins/verification.py). Metrics, under the evaluator's
label: ``eval/<label>/accuracy`` (mean score over prompts with a reference),
``eval/<label>/extract_failures`` (answers nothing could be extracted from; they score 0),
``eval/<label>/prompts`` (prompts with a reference), ``eval/<label>/mean_length`` (tokens).
"""

from __future__ import annotations

from pathlib import Path

import loop
from plugins.evaluators import heldout
from plugins.verification import Verifier, VerifyOptions


class VerifyEvaluator(loop.Evaluator):
    name = "verify"

    class Options(heldout.HeldoutOptions, VerifyOptions):
        pass

    def heldout_request(self):
        return heldout.request(self.options, self.label)

    def setup(self, ctx) -> None:
        base = getattr(ctx.config, "source_dir", None)
        self.verifier = Verifier(self.options, Path(base) if base else None)

    def evaluate(self, ctx) -> dict[str, float]:
        prompts = [p for p in self.heldout if p.answer is not None]
        if not prompts:
            raise loop.UserError(
                f"evaluator {self.label!r}: none of its {len(self.heldout)} held-out prompts "
                f"carries a reference answer; give the prompts file an `{self.options.answer_field}` "
                "field (or set answer_field)"
            )
        answers = heldout.answer(ctx, prompts, self.options, ctx.adapter, self.label)
        checks = [self.verifier.check(p.text, a.text, p.answer) for p, a in zip(prompts, answers)]
        n = len(prompts)
        key = f"eval/{self.label}"
        return {
            f"{key}/accuracy": sum(ch.score for ch in checks) / n,
            f"{key}/extract_failures": float(sum(ch.failed for ch in checks)),
            f"{key}/prompts": float(n),
            f"{key}/mean_length": sum(a.num_tokens for a in answers) / n,
        }


@loop.hookimpl
def register_evaluators(register):
    register(VerifyEvaluator)
