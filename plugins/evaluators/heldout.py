"""What the ``winrate`` and ``verify`` evaluators share: where their held-out prompts come
from, and answering them with one policy.

    path = "heldout.jsonl"     # their own prompts file (JSONL with `prompt`, `answer`), or
    heldout = 200              # ... prompts split off a prompt source before the run
    source = "dataset"         # that source's label (default: the first [[prompts]])

Either way the runner records the set in the ``heldout`` table and refuses to let any of
these prompts reach training (loop/heldout.py).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

import loop
from loop.heldout import HeldoutRequest
from plugins.prompts.dataset import read_prompts


class HeldoutOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A prompts file of the evaluator's own (.jsonl or .txt; relative to the config file).
    path: str | None = None
    field: str = "prompt"  # JSONL key of the prompt text
    system_field: str | None = None  # JSONL key of a system prompt, if any
    answer_field: str | None = "answer"  # JSONL key of the reference answer
    # Or: this many prompts split off a prompt source before the run (never proposed).
    heldout: int | None = Field(None, ge=1)
    source: str | None = None  # the prompt source's label (None: the first [[prompts]])
    # Answering: greedy by default, so a round's answers are one fixed function of its policy.
    temperature: float = Field(0.0, ge=0.0)
    max_new_tokens: int = Field(256, ge=1)

    @field_validator("path")
    @classmethod
    def _resolve(cls, value, info: ValidationInfo):
        if value is None:
            return value
        p = Path(value).expanduser()
        base = (info.context or {}).get("source_dir")
        if not p.is_absolute() and base is not None:
            p = Path(base) / p
        if not p.is_file():
            raise ValueError(f"held-out prompts file {value!r} not found (looked at {p}); fix the path")
        return str(p.resolve())

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.heldout is None):
            raise ValueError("give exactly one of `path` (a prompts file) or `heldout = K` "
                             "(prompts split off a prompt source)")
        if self.source is not None and self.heldout is None:
            raise ValueError("`source` goes with `heldout = K`; remove it when giving `path`")
        if self.path is not None:
            read_prompts(Path(self.path), self.field, self.system_field, self.answer_field)
        return self


def request(options: HeldoutOptions, label: str) -> HeldoutRequest:
    if options.heldout is not None:
        return HeldoutRequest(k=options.heldout, source=options.source)
    rows = read_prompts(Path(options.path), options.field, options.system_field, options.answer_field)
    prompts = [loop.Prompt(text=t, system=s, answer=a, source=options.path,
                           meta={"line_index": i, "key": f"{options.path}:{i + 1}"})
               for i, (t, s, a) in enumerate(rows)]
    return HeldoutRequest(prompts=prompts, file=options.path)


def answer(ctx, prompts: list[loop.Prompt], options: HeldoutOptions, adapter: str | None,
           seed_label: str) -> list[loop.Completion]:
    """One answer per prompt from base + ``adapter`` (None: the base model)."""
    if ctx.generator is None:
        raise loop.UserError("held-out evaluators need the run's generator")
    sampling = loop.Sampling(n=1, temperature=options.temperature, max_new_tokens=options.max_new_tokens,
                             seed=ctx.derive_seed(seed_label))
    outs = ctx.generator.generate(ctx, [p.chat() for p in prompts], sampling, adapter=adapter)
    return [group[0] for group in outs]
