"""Guards: a phase fails loudly instead of a run quietly learning nothing.

    [guards]
    max_parse_failure_rate = 0.5   # per judge and round: share of its judgments unparsed
    max_truncated_rate = 0.5       # per judge and round: share of its outputs cut at max_new_tokens
    min_train_examples = 1         # per round: pairs + selected examples the selector made

Past a guard the phase fails with one message that names the judge (or the selector),
the rate, one raw judge output, and what to change; ``selfloop resume RUN --set ...``
after the fix re-runs the phase. Set a guard to 1.0 (or ``min_train_examples = 0``) to
switch it off.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from loop.errors import UserError


class GuardsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Fail the judge phase when a judge leaves more than this share of its judgments unparsed.
    max_parse_failure_rate: float = Field(0.5, ge=0, le=1)
    # Fail the judge phase when more than this share of a judge's outputs hit max_new_tokens.
    max_truncated_rate: float = Field(0.5, ge=0, le=1)
    # Fail the select phase when the selector makes fewer training examples than this.
    min_train_examples: int = Field(1, ge=0)


class GuardFailed(UserError):
    """A guard stopped the phase; the message says what to change, then resume."""


def _shown(raw: str, limit: int = 160) -> str:
    text = raw if len(raw) <= limit else raw[: limit - 3] + "..."
    return repr(text)


def _resume_hint(run_dir, fix: str) -> str:
    return f"then `selfloop resume {run_dir} --set {fix}`"


def check_judge(guards: GuardsConfig, *, field: str, judge, judgments: list, outputs: int,
                truncated: int, round: int, run_dir, phase: str = "judge",
                truncated_sample: str | None = None) -> None:
    """Raise ``GuardFailed`` when the judge at config ``field`` (``judges[0]``,
    ``evaluators[1].judge``) is past a guard this round."""
    label = judge.label
    max_new = getattr(judge.options, "max_new_tokens", None)
    template = getattr(judge.options, "template", None)
    n = len(judgments)
    failures = [j for j in judgments if j.score is None]
    parse_rate = len(failures) / n if n else 0.0
    trunc_rate = truncated / outputs if outputs else 0.0
    where = f"round {round} {phase}: judge {label!r} ({field})"
    limits = {k: v for k, v in judge.options.model_dump().items() if k.endswith("max_new_tokens")}
    tokens_fix = (f"raise {field}.max_new_tokens (now {max_new})" if max_new is not None
                  else "raise " + " / ".join(f"{field}.{k} (now {v})" for k, v in limits.items())
                  if limits else f"give {field} room to finish its answers")
    if n and parse_rate > guards.max_parse_failure_rate:
        sample = next((j.raw for j in failures if j.raw), failures[0].error or "")
        cut = f"; {truncated} of {outputs} outputs were cut at max_new_tokens" if outputs else ""
        fix = tokens_fix if outputs and truncated else (
            f"{field}.template ({template!r}) must make the judge end with its score line"
            if template else f"change {field}'s options so its outputs parse")
        hint = (f"{field.replace('[', '.').replace(']', '')}.max_new_tokens={max(4 * max_new, 64)}"
                if max_new is not None and outputs and truncated else "guards.max_parse_failure_rate=1.0")
        raise GuardFailed(
            f"{where} could not parse {len(failures)} of {n} judgments ({parse_rate:.0%}; "
            f"guards.max_parse_failure_rate = {guards.max_parse_failure_rate:g}){cut}. "
            f"One raw output: {_shown(sample)}. Fix: {fix}, {_resume_hint(run_dir, hint)}"
        )
    if outputs and trunc_rate > guards.max_truncated_rate:
        sample = truncated_sample if truncated_sample is not None else next(
            (j.raw for j in judgments if (j.meta or {}).get("finish_reason") == "length"),
            judgments[0].raw if judgments else "")
        dotted = field.replace("[", ".").replace("]", "")
        if max_new is not None:
            hint = f"{dotted}.max_new_tokens={max(4 * max_new, 64)}"
        elif limits:
            hint = " --set ".join(f"{dotted}.{k}={max(4 * v, 64)}" for k, v in limits.items())
        else:
            hint = "guards.max_truncated_rate=1.0"
        raise GuardFailed(
            f"{where}: {truncated} of {outputs} outputs ({trunc_rate:.0%}) were cut at "
            f"max_new_tokens (guards.max_truncated_rate = {guards.max_truncated_rate:g}). "
            f"One raw output: {_shown(sample)}. Fix: {tokens_fix}, {_resume_hint(run_dir, hint)}"
        )


def check_selection(guards: GuardsConfig, *, selector, examples: int, candidates: int,
                    scored: int, round: int, run_dir) -> None:
    """Raise ``GuardFailed`` when the selector made too few training examples."""
    if examples >= guards.min_train_examples:
        return
    why = ("no candidate has a valid judge score (see the judges' parse failures)" if scored == 0
           else f"{scored} of {candidates} candidates have a valid score, but no prompt's "
                "scores differ enough to make an example")
    raise GuardFailed(
        f"round {round} select: selector {selector.label!r} made {examples} training examples "
        f"(guards.min_train_examples = {guards.min_train_examples}): {why}. Fix: more "
        "diverse answers (generate.n, generate.temperature), a judge that separates them, or "
        "a lower selector threshold (selector.min_margin), "
        + _resume_hint(run_dir, "generate.n=8")
        + "; or allow an empty round with --set guards.min_train_examples=0"
    )
