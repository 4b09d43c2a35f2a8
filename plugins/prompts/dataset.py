"""``dataset``: prompts from your own data, a fixed number per round.

    [[prompts]]
    name = "dataset"
    path = "prompts.jsonl"    # .jsonl/.json, .csv/.tsv, .parquet, .txt, a save_to_disk
                              # folder, or a dataset name in the local datasets cache
    field = "prompt"          # the column holding the prompt text (else chat `messages`)
    per_round = 64

Data is read through the ``datasets`` library (plugins/prompts/reading.py: formats, chat
rows, the optional ``answer`` column) and checked when the config is validated (before any
run folder exists); a relative path is taken from the config file's folder and saved
absolute. Each round takes the next ``per_round`` prompts of a shuffled order (seeded by the
run seed, reshuffled each pass over the data), so rounds see different prompts and a
resumed round sees the same ones.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

import loop
from plugins.prompts.reading import HUB_NAME, PromptSpec, read_prompt_data


class DatasetPrompts(loop.PromptSource):
    name = "dataset"

    class Options(loop.PromptSource.Options):
        path: str  # a prompts file, a save_to_disk folder, or a cached dataset name
        field: str = "prompt"  # the column holding the prompt text
        messages_field: str = "messages"  # else: the column holding chat turns
        system_field: str | None = None  # an optional column holding a system prompt
        answer_field: str = "answer"  # an optional column with the reference answer
        split: str = "train"  # the split of a folder or cached dataset with several
        subset: str | None = None  # a cached dataset's configuration name, if it has several
        per_round: int = Field(64, ge=1)  # prompts each round adds
        shuffle: bool = True  # False: take the data in order

        @field_validator("path")
        @classmethod
        def _resolve(cls, value: str, info: ValidationInfo) -> str:
            p = Path(value).expanduser()
            base = (info.context or {}).get("source_dir")
            if not p.is_absolute() and base is not None:
                p = Path(base) / p
            if p.exists():
                return str(p.resolve())
            if HUB_NAME.match(value) and not p.suffix:
                return value  # a dataset name: looked up in the local cache
            raise ValueError(f"prompts file {value!r} not found (looked at {p}); fix the path")

        def spec(self) -> PromptSpec:
            return PromptSpec(self.path, self.field, self.messages_field, self.system_field,
                              self.answer_field, self.split, self.subset)

        @model_validator(mode="after")
        def _readable(self):
            read_prompt_data(self.spec())
            return self

    def setup(self, ctx) -> None:
        self._data = read_prompt_data(self.options.spec())
        self._orders: dict[int, object] = {}

    def _order(self, seed: int, epoch: int):
        """The data's order in pass ``epoch``: a seeded permutation (a numpy array, 8 bytes
        a row, however large the data), the same on every resume."""
        import numpy as np

        if epoch not in self._orders:
            n = len(self._data)
            if self.options.shuffle:
                key = hashlib.sha256(f"{seed}:dataset:{epoch}".encode()).digest()
                rng = np.random.Generator(np.random.PCG64(int.from_bytes(key[:8], "little")))
                self._orders[epoch] = rng.permutation(n)
            else:
                self._orders[epoch] = np.arange(n)
        return self._orders[epoch]

    def propose(self, ctx) -> list[loop.Prompt]:
        n, k = len(self._data), self.options.per_round
        start = (ctx.round - 1) * k  # rounds are numbered from 1
        prompts = []
        for i in range(start, start + k):
            epoch, pos = divmod(i, n)
            index = int(self._order(ctx.config.seed, epoch)[pos])
            text, system, answer = self._data.row(index)
            meta = {"line_index": index, "epoch": epoch}
            if answer is not None:
                meta["answer"] = answer
            prompts.append(loop.Prompt(text=text, system=system, source=self.label, meta=meta))
        return prompts


@loop.hookimpl
def register_prompt_sources(register):
    register(DatasetPrompts)
