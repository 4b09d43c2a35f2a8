"""``dataset``: prompts from your own file, a fixed number per round.

    [[prompts]]
    name = "dataset"
    path = "prompts.jsonl"   # JSONL: one object per line, the prompt under `field`
    field = "prompt"          # or a .txt file: one prompt per line
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


def read_prompts(path: Path, field: str, system_field: str | None) -> list[tuple[str, str | None]]:
    """(prompt, system) per line; ValueError naming the line for anything malformed."""
    out = []
    jsonl = path.suffix in (".jsonl", ".json")
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if not jsonl:
                out.append((line, None))
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
            out.append((row[field], system if isinstance(system, str) else None))
    if not out:
        raise ValueError(f"{path}: no prompts in the file")
    return out


class DatasetPrompts(loop.PromptSource):
    name = "dataset"

    class Options(loop.PromptSource.Options):
        path: str  # a .jsonl file (one object per line) or a text file (one prompt per line)
        field: str = "prompt"  # the JSONL key holding the prompt text
        system_field: str | None = None  # an optional JSONL key holding a system prompt
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
            read_prompts(Path(self.path), self.field, self.system_field)
            return self

    def setup(self, ctx) -> None:
        self._rows = read_prompts(Path(self.options.path), self.options.field, self.options.system_field)
        self._orders: dict[int, list[int]] = {}

    def _order(self, seed: int, epoch: int) -> list[int]:
        """The file's order in pass ``epoch``: a seeded shuffle, the same on every resume."""
        if epoch not in self._orders:
            order = list(range(len(self._rows)))
            if self.options.shuffle:
                random.Random(f"{seed}:dataset:{epoch}").shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]

    def propose(self, ctx) -> list[loop.Prompt]:
        n, k = len(self._rows), self.options.per_round
        start = (ctx.round - 1) * k  # rounds are numbered from 1
        prompts = []
        for i in range(start, start + k):
            epoch, pos = divmod(i, n)
            index = self._order(ctx.config.seed, epoch)[pos]
            text, system = self._rows[index]
            prompts.append(loop.Prompt(text=text, system=system, source=self.label,
                                       meta={"line_index": index, "epoch": epoch}))
        return prompts


@loop.hookimpl
def register_prompt_sources(register):
    register(DatasetPrompts)
