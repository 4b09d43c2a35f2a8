"""``dataset``: prompts from your own file, a fixed number per round.

    [[prompts]]
    name = "dataset"
    path = "prompts.jsonl"   # JSONL: one object per line, the prompt under `field`
    field = "prompt"          # or a .txt file: one prompt per line
    answer_field = "answer"   # a reference answer, if the rows have one (for `verify`)
    per_round = 64

The file is read and checked when the config is validated (before any run folder
exists); a relative path is taken from the config file's folder and saved absolute. Each
round takes the next ``per_round`` prompts of a shuffled order (seeded by the run seed,
reshuffled each pass over the file), so rounds see different prompts and a resumed
round sees the same ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

import loop


def read_prompts(path: Path, field: str, system_field: str | None,
                 answer_field: str | None = None) -> list[tuple[str, str | None, str | None]]:
    """(prompt, system, answer) per line; ValueError naming the line for anything malformed.

    A reference answer may be a string or a number (kept as its text); a row without
    ``answer_field`` has None."""
    out = []
    jsonl = path.suffix in (".jsonl", ".json")
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if not jsonl:
                out.append((line, None, None))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not JSON ({e.msg}); write one object per line")
            if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(
                    f"{path}: line {number} has no text under {field!r}; set `field` to the key "
                    "that holds the prompt"
                )
            system = row.get(system_field) if system_field else None
            answer = row.get(answer_field) if answer_field else None
            if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
                raise ValueError(
                    f"{path}: line {number}: {answer_field!r} must be a string or a number, "
                    f"got {type(answer).__name__}; write the reference answer as text"
                )
            out.append((row[field], system if isinstance(system, str) else None,
                        None if answer is None else str(answer)))
    if not out:
        raise ValueError(f"{path}: no prompts in the file")
    return out


class DatasetPrompts(loop.PromptSource):
    name = "dataset"

    class Options(loop.PromptSource.Options):
        path: str  # a .jsonl file (one object per line) or a text file (one prompt per line)
        field: str = "prompt"  # the JSONL key holding the prompt text
        system_field: str | None = None  # an optional JSONL key holding a system prompt
        answer_field: str | None = "answer"  # JSONL key of a reference answer (verify), if any
        per_round: int = Field(64, ge=1)  # prompts each round adds
        shuffle: bool = True  # False: take the file in order

        @field_validator("path")
        @classmethod
        def _resolve(cls, value: str, info: ValidationInfo) -> str:
            p = Path(value).expanduser()
            base = (info.context or {}).get("source_dir")
            if not p.is_absolute() and base is not None:
                p = Path(base) / p
            if not p.is_file():
                raise ValueError(f"prompts file {value!r} not found (looked at {p}); fix the path")
            return str(p.resolve())

        @model_validator(mode="after")
        def _readable(self):
            read_prompts(Path(self.path), self.field, self.system_field, self.answer_field)
            return self

    def _read(self) -> None:
        if getattr(self, "_rows", None) is None:
            o = self.options
            self._rows = read_prompts(Path(o.path), o.field, o.system_field, o.answer_field)
            self._orders: dict[int, list[int]] = {}
            self._held: set[int] = set()

    def setup(self, ctx) -> None:
        self._read()

    def split_heldout(self, k: int, seed: int) -> list[loop.Prompt]:
        """``k`` rows chosen by a seeded shuffle, never proposed afterwards."""
        self._read()
        if k >= len(self._rows):
            raise loop.UserError(
                f"{self.options.path}: heldout = {k} would hold out all {len(self._rows)} prompts "
                "of the file; hold out fewer, or give the evaluator its own `path`"
            )
        order = list(range(len(self._rows)))
        random.Random(f"{seed}:dataset:heldout").shuffle(order)
        self._held = set(order[:k])
        self._orders = {}
        return [self._prompt(i) for i in sorted(self._held)]

    def _prompt(self, index: int, **meta) -> loop.Prompt:
        text, system, answer = self._rows[index]
        return loop.Prompt(text=text, system=system, source=self.label, answer=answer,
                           meta={"line_index": index, **meta,
                                 "key": f"{self.options.path}:{index + 1}"})

    def _order(self, seed: int, epoch: int) -> list[int]:
        """The file's order in pass ``epoch``: a seeded shuffle, the same on every resume.
        Rows held out for an evaluator are left out."""
        if epoch not in self._orders:
            order = [i for i in range(len(self._rows)) if i not in self._held]
            if self.options.shuffle:
                random.Random(f"{seed}:dataset:{epoch}").shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]

    def propose(self, ctx) -> list[loop.Prompt]:
        self._read()
        n, k = len(self._rows) - len(self._held), self.options.per_round
        start = (ctx.round - 1) * k  # rounds are numbered from 1
        prompts = []
        for i in range(start, start + k):
            epoch, pos = divmod(i, n)
            index = self._order(ctx.config.seed, epoch)[pos]
            prompts.append(self._prompt(index, epoch=epoch))
        return prompts


@loop.hookimpl
def register_prompt_sources(register):
    register(DatasetPrompts)
