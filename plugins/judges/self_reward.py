"""LLM-as-a-judge: the policy grades its own answers (Self-Rewarding Language Models,
Yuan et al., 2024, section 2.2 and Fig. 2).

Config::

    [[judges]]
    name = "self_reward"
    samples = 3          # judge samples per candidate; the runner averages the valid ones
    temperature = 0.7

The judge renders ``prompts/self_reward.j2`` (an additive 0-5 rubric) for each
candidate, sends it as one user message to the run's generator with the current adapter,
and keeps only the judge's own final ``Score: N`` line (see ``parse_score``).
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

import loop
from loop.templates import quote

# The whole final line: "Score:", optional blanks, ASCII digits with an optional fraction.
_SCORE_LINE = re.compile(r"Score:[ \t]*([0-9]+(?:\.[0-9]+)?)", re.ASCII)


def parse_score(text: str, low: float = 0, high: float = 5) -> float | None:
    """The score of a judge's reply, or None when the reply does not end with a valid one.

    The rule, exactly:

    1. Take the last line of ``text`` that is not blank (lines split by ``str.splitlines``,
       blank meaning empty after ``str.strip``). No such line -> None.
    2. That line, stripped of surrounding whitespace, must be exactly ``Score:`` followed
       by optional spaces or tabs and one number made of ASCII digits ``0-9`` with an
       optional fraction (``4``, ``4.0``, ``3.5``). Anything else on the line (a second
       number, ``/5``, a trailing full stop, markdown, a sign, non-ASCII digits such as
       ``５`` or ``٥``, lower-case ``score:``) -> None.
    3. The number must lie in ``[low, high]`` (inclusive) -> it is returned as a float;
       otherwise None.

    Only the final line counts, so a ``Score: 5`` the judge quotes from the graded answer
    earlier in its reply never scores, and a reply cut off by ``max_new_tokens`` before its
    final line is None. Nothing is coerced, rounded or clamped.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    match = _SCORE_LINE.fullmatch(lines[-1].strip())
    if match is None:
        return None
    value = float(match.group(1))
    if not low <= value <= high:
        return None
    return value


class SelfRewardJudge(loop.Judge):
    """The policy as its own judge: k sampled gradings per candidate, each stored raw."""

    name = "self_reward"

    class Options(loop.ModelJudgeOptions):
        # A name in prompts/ (without .j2) or a path to a .j2 file using {prompt, response}.
        template: str = "self_reward"
        # Judge samples per candidate: the paper averages 3 to reduce the judge's variance.
        samples: int = Field(3, ge=1)
        # Sampling temperature for the judge (the paper samples; 0 would make k samples equal).
        temperature: float = Field(0.7, ge=0.0)
        # Nucleus sampling for the judge; 1.0 keeps the whole distribution.
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        # Room for the justification (~100 words asked) and the final Score line.
        max_new_tokens: int = Field(256, ge=1)
        # The rubric's range; a final score outside it is a parse failure, not clamped.
        min_score: float = 0
        max_score: float = 5
        # Candidates per generator call (the generator batches again inside); progress unit.
        batch_size: int = Field(64, ge=1)

        @model_validator(mode="after")
        def _range(self):
            if self.max_score <= self.min_score:
                raise ValueError(
                    f"max_score ({self.max_score}) must be above min_score ({self.min_score})"
                )
            return self

    def setup(self, ctx) -> None:
        self._load_template(ctx)  # a bad template fails at start-up, not mid-round

    def _load_template(self, ctx):
        return ctx.template(self.options.template, {"prompt", "response"})

    def judge(self, ctx, candidates: list[loop.Candidate]) -> loop.JudgeResult:
        if ctx.generator is None:
            raise RuntimeError("self_reward judge needs the run's generator (ctx.generator)")
        opts = self.options
        template = self._load_template(ctx)
        judgments: list[loop.Judgment] = []
        result = loop.JudgeResult(judgments=judgments)
        for index, start in enumerate(range(0, len(candidates), opts.batch_size)):
            chunk = candidates[start : start + opts.batch_size]
            chats = [_judge_chat(template, c) for c in chunk]
            sampling = loop.Sampling(
                n=opts.samples,
                temperature=opts.temperature,
                top_p=opts.top_p,
                max_new_tokens=opts.max_new_tokens,
                seed=ctx.derive_seed(self.label, index),
            )
            outputs = ctx.generator.generate(
                ctx, chats, sampling, adapter=self.judge_adapter(ctx), progress=False
            )
            for candidate, completions in zip(chunk, outputs):
                result.count(completions)
                for i, completion in enumerate(completions):
                    score = parse_score(completion.text, opts.min_score, opts.max_score)
                    judgments.append(
                        loop.Judgment(
                            candidate=candidate,
                            score=score,
                            raw=completion.text,
                            sample_index=i,
                            error=None if score is not None else "unparseable",
                            meta={"finish_reason": completion.finish_reason},
                        )
                    )
            ctx.progress(start + len(chunk), len(candidates))
        result.metrics = _metrics(judgments)
        return result


def _judge_chat(template, candidate: loop.Candidate) -> loop.Chat:
    """The grading request for one candidate, as one user message."""
    text = template.render(prompt=quote(candidate.prompt.text), response=quote(candidate.text))
    return [{"role": "user", "content": text}]


def _metrics(judgments: list[loop.Judgment]) -> dict[str, float]:
    valid = [j.score for j in judgments if j.score is not None]
    metrics = {
        "judge/samples": float(len(judgments)),
        "judge/parse_failures": float(len(judgments) - len(valid)),
    }
    if judgments:
        metrics["judge/parse_failure_rate"] = (len(judgments) - len(valid)) / len(judgments)
    if valid:
        metrics["judge/mean_score"] = sum(valid) / len(valid)
    return metrics


@loop.hookimpl
def register_judges(register):
    register(SelfRewardJudge)
