"""``dataset``: prompts from your own data, a fixed number per round.

    [[prompts]]
    name = "dataset"
    path = "prompts.jsonl"    # .jsonl/.json, .csv/.tsv, .parquet, .txt, a save_to_disk
                              # folder, or a dataset name in the local datasets cache
    field = "prompt"          # the column holding the prompt text (else chat `messages`)
    answer_field = "answer"   # a reference answer, if the rows have one (for `verify`)
    per_round = 64

Data is read through the ``datasets`` library (plugins/prompts/reading.py: formats, chat
rows, the optional ``answer`` column) and checked when the config is validated (before any
run folder exists); a relative path is taken from the config file's folder and saved
absolute. Each round takes the next ``per_round`` prompts of a shuffled order (seeded by the
run seed, reshuffled each pass over the data), so rounds see different prompts and a
resumed round sees the same ones. Rows an evaluator holds out (``heldout = K``) are never
proposed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

import loop
from plugins.prompts.reading import HUB_NAME, PromptSpec, read_prompt_data


def _permutation(n: int, key: str):
    """A seeded permutation of range(n) as a numpy array (8 bytes a row, however large)."""
    import numpy as np

    digest = hashlib.sha256(key.encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))
    return rng.permutation(n)


def read_prompts(path: str | Path, field: str = "prompt", system_field: str | None = None,
                 answer_field: str | None = "answer") -> list[tuple[str, str | None, str | None]]:
    """Every (prompt, system, answer) of a (small) prompts file, read as the source reads
    it; ValueError naming the file, row and field for anything malformed."""
    data = read_prompt_data(PromptSpec(str(path), field, "messages", system_field, answer_field))
    rows = (data.row(i) for i in range(len(data)))
    return [(t, s, None if a is None else str(a)) for t, s, a in rows]


class DatasetPrompts(loop.PromptSource):
    name = "dataset"

    class Options(loop.PromptSource.Options):
        path: str  # a prompts file, a save_to_disk folder, or a cached dataset name
        field: str = "prompt"  # the column holding the prompt text
        messages_field: str = "messages"  # else: the column holding chat turns
        system_field: str | None = None  # an optional column holding a system prompt
        answer_field: str | None = "answer"  # an optional column with the reference answer
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

    def _read(self) -> None:
        if getattr(self, "_data", None) is None:
            import numpy as np

            self._data = read_prompt_data(self.options.spec())
            self._orders: dict[int, object] = {}
            self._held = np.zeros(0, dtype=np.int64)  # sorted row indices held out

    def setup(self, ctx) -> None:
        self._read()

    def split_heldout(self, k: int, seed: int) -> list[loop.Prompt]:
        """``k`` rows chosen by a seeded shuffle, never proposed afterwards. Two evaluators
        splitting one file get nested sets (the first k of one shuffled order)."""
        import numpy as np

        self._read()
        n = len(self._data)
        if k >= n:
            raise loop.UserError(
                f"{self.options.path}: heldout = {k} would hold out all {n} prompts "
                "of the file; hold out fewer, or give the evaluator its own `path`"
            )
        chosen = np.sort(_permutation(n, f"{seed}:dataset:heldout")[:k])
        self._held = np.union1d(self._held, chosen)
        self._orders = {}
        return [self._prompt(int(i)) for i in chosen]

    def _prompt(self, index: int, **meta) -> loop.Prompt:
        text, system, answer = self._data.row(index)
        return loop.Prompt(text=text, system=system, source=self.label,
                           answer=None if answer is None else str(answer),
                           meta={"line_index": index, **meta,
                                 "key": f"{self.options.path}:{index + 1}"})

    def _order(self, seed: int, epoch: int):
        """The data's order in pass ``epoch``: a seeded permutation, the same on every
        resume. Rows held out for an evaluator are left out."""
        import numpy as np

        if epoch not in self._orders:
            n = len(self._data)
            rows = np.setdiff1d(np.arange(n), self._held, assume_unique=True) if len(self._held) else np.arange(n)
            if self.options.shuffle:
                rows = rows[_permutation(len(rows), f"{seed}:dataset:{epoch}")]
            self._orders[epoch] = rows
        return self._orders[epoch]

    def propose(self, ctx) -> list[loop.Prompt]:
        self._read()
        n, k = len(self._data) - len(self._held), self.options.per_round
        start = (ctx.round - 1) * k  # rounds are numbered from 1
        prompts = []
        for i in range(start, start + k):
            epoch, pos = divmod(i, n)
            index = int(self._order(ctx.config.seed, epoch)[pos])
            prompts.append(self._prompt(index, epoch=epoch))
        return prompts


@loop.hookimpl
def register_prompt_sources(register):
    register(DatasetPrompts)
