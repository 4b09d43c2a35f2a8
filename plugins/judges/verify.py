"""``verify``: a verifier judge, scoring answers against their prompt's reference answer.

    [[judges]]
    name = "verify"
    extract = "last_number"   # exact | last_number | boxed | regex (+ pattern)
    # function = "my_pkg.checks:score"   # or (prompt, answer, reference) -> [0, 1]

Each candidate of a prompt that carries a reference answer (``Prompt.answer``: a
dataset's ``answer`` field, the tiny world's solutions) gets one judgment: 1.0 when the
answer checks, 0.0 when not (a function may give anything in [0, 1]); ``raw`` says what was
extracted and the reference. Candidates of prompts without a reference get no judgment
(counted in ``judge/unreferenced``). With ``top_k`` + ``raft`` this is rejection-sampling
self-training (STaR, Zelikman et al. 2022; ReST-EM, Singh et al. 2023); with ``pairs`` +
``dpo``, verifier-ranked iterative DPO. The checking code is ``plugins/verification.py``,
shared with the ``verify`` evaluator.
"""

from __future__ import annotations

from pathlib import Path

import loop
from plugins.verification import Verifier, VerifyOptions


def reference(prompt: loop.Prompt) -> str | None:
    """The prompt's reference answer; a rewrite (BPO) asks its original's question."""
    while prompt.answer is None and prompt.kind == "rewrite" and prompt.parent is not None:
        prompt = prompt.parent
    return prompt.answer


class VerifyJudge(loop.Judge):
    name = "verify"

    class Options(VerifyOptions):
        pass

    def setup(self, ctx) -> None:
        base = getattr(ctx.config, "source_dir", None)
        self.verifier = Verifier(self.options, Path(base) if base else None)

    def judge(self, ctx, candidates: list[loop.Candidate]) -> loop.JudgeResult:
        if not hasattr(self, "verifier"):
            self.setup(ctx)
        judgments, unreferenced, failed = [], 0, 0
        for cand in candidates:
            ref = reference(cand.prompt)
            if ref is None:
                unreferenced += 1
                continue
            check = self.verifier.check(cand.prompt.text, cand.text, ref)
            failed += check.failed
            shown = "(nothing extracted)" if check.failed else repr(check.extracted)
            judgments.append(loop.Judgment(
                candidate=cand, score=check.score,
                raw=f"extracted: {shown}; reference: {ref!r}; score: {check.score:g}",
                meta={"extract_failed": check.failed},
            ))
        metrics = {"judge/unreferenced": float(unreferenced),
                   "judge/extract_failures": float(failed)}
        if judgments:
            metrics["judge/accuracy"] = sum(j.score for j in judgments) / len(judgments)
        if candidates and not judgments:
            ctx.event(f"verify judge {self.label!r}: no candidate's prompt carries a reference "
                      "answer (`answer` field); nothing was scored", level="warning")
        return loop.JudgeResult(judgments=judgments, metrics=metrics)


@loop.hookimpl
def register_judges(register):
    register(VerifyJudge)
