"""Prompt data in the formats users have, read through the ``datasets`` library.

``read_prompt_data(spec)`` opens what ``path`` names and checks every row once:

- ``.jsonl`` / ``.json`` (JSON Lines or one JSON array), ``.csv``, ``.tsv``, ``.parquet``,
  ``.txt`` (one prompt per line, blank lines skipped);
- a folder written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``: ``split``
  picks the split);
- a dataset name (``"owner/name"``) already in the local ``datasets`` cache: read offline,
  never downloaded.

Each row holds the prompt either as text under ``field`` or as chat ``messages``
(``[{"role": ..., "content": ...}]``): system turns become the prompt's system message and
the last user turn is the one answered; assistant turns after it (a dataset's reference
answers) are ignored, and turns before it are refused, since a prompt is one user turn.
An optional ``answer`` column (``answer_field``) travels with the prompt for verifiers.

Files are converted once into the ``datasets`` cache (Arrow, memory-mapped) and read from
there in batches, so memory stays flat however large the file is (bench/prompt_memory.py).
A bad file fails here, at validation, with one ``ValueError`` naming the file, the row (or
line) and the field.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# File suffix -> (datasets builder, its options). Text and CSV drop a UTF-8 byte-order
# mark (pyarrow's JSON reader and Parquet need no help).
BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {"encoding": "utf-8-sig"}),
    ".tsv": ("csv", {"sep": "\t", "encoding": "utf-8-sig"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {"encoding": "utf-8-sig"}),
}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ROLES = ("system", "user", "assistant")
BATCH = 4096


@dataclass(frozen=True)
class PromptSpec:
    path: str  # a file, a save_to_disk folder, or a cached dataset name
    field: str = "prompt"
    messages_field: str = "messages"
    system_field: str | None = None
    answer_field: str | None = "answer"
    split: str = "train"
    subset: str | None = None


class PromptData:
    """The checked rows: ``len(data)``, ``data.row(i) -> (text, system, answer)``."""

    def __init__(self, spec: PromptSpec, ds, column: str, chat: bool, answer: bool):
        self.spec, self._ds, self._column, self._chat = spec, ds, column, chat
        self._answer = answer

    def __len__(self) -> int:
        return len(self._ds)

    def row(self, index: int) -> tuple[str, str | None, object]:
        row = self._ds[int(index)]
        if self._chat:
            text, system = chat_prompt(row[self._column])
        else:
            text = row[self._column]
            system = row.get(self.spec.system_field) if self.spec.system_field else None
        return text, system, (row[self.spec.answer_field] if self._answer else None)


def read_prompt_data(spec: PromptSpec) -> PromptData:
    """Open and check ``spec.path``; ValueError naming file, row and field otherwise."""
    path = Path(spec.path)
    stat = path.stat() if path.exists() else None
    key = (stat.st_mtime_ns, stat.st_size) if stat and path.is_file() else None
    return _read(spec, key)


@lru_cache(maxsize=8)
def _read(spec: PromptSpec, _file_key) -> PromptData:
    # _file_key (mtime, size) makes an edited file a new cache entry: validation and the
    # run's setup in one process check a file once.
    ds, where = _open(spec)
    text_file = Path(spec.path).suffix == ".txt"
    if text_file:  # one prompt per line: datasets' text reader names the column "text"
        column, chat = "text", False
    elif spec.field in ds.column_names:
        column, chat = spec.field, False
    elif spec.messages_field in ds.column_names:
        column, chat = spec.messages_field, True
    else:
        raise ValueError(
            f"{where}: no column {spec.field!r} (prompt text) or {spec.messages_field!r} "
            f"(chat messages); it has {ds.column_names}: set `field` to the column that "
            "holds the prompt"
        )
    keep = [column]
    if spec.system_field and not chat:
        if spec.system_field not in ds.column_names:
            raise ValueError(f"{where}: no column {spec.system_field!r} (system_field); "
                             f"it has {ds.column_names}")
        keep.append(spec.system_field)
    answer = spec.answer_field in ds.column_names
    if answer:
        keep.append(spec.answer_field)
    ds = ds.select_columns(keep)
    if text_file:  # blank lines are not prompts
        ds = _quiet(lambda: ds.filter(lambda b: [bool(t.strip()) for t in b[column]],
                                      batched=True, batch_size=BATCH))
    if len(ds) == 0:
        raise ValueError(f"{where}: no prompts in the file")
    try:
        _check(ds, where, spec, column, chat, answer)
    except UnicodeDecodeError as e:  # pyarrow's JSON reader lets bad UTF-8 through
        if not Path(spec.path).is_file():
            raise ValueError(f"{where}: text that is not UTF-8 ({e})") from None
        builder = BUILDERS.get(Path(spec.path).suffix.lower(), ("parquet", {}))[0]
        raise ValueError(_file_error(Path(spec.path), builder, e)) from None
    return PromptData(spec, ds, column, chat, answer)


def _check(ds, where: str, spec: PromptSpec, column: str, chat: bool, answer: bool) -> None:
    """Every row once, in batches (memory stays flat)."""
    start = 0
    for batch in ds.iter(batch_size=BATCH):
        for i, value in enumerate(batch[column]):
            row = start + i + 1
            if chat:
                try:
                    chat_prompt(value)
                except ValueError as e:
                    raise ValueError(f"{where}: row {row}: {column!r}: {e}") from None
            elif not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}: row {row} has no text under {column!r}; set `field` to the "
                    "column that holds the prompt"
                )
            if spec.system_field and not chat:
                system = batch[spec.system_field][i]
                if system is not None and not isinstance(system, str):
                    raise ValueError(f"{where}: row {row}: {spec.system_field!r} must be text")
            if answer:
                value = batch[spec.answer_field][i]
                if value is not None and not isinstance(value, (str, int, float, bool)):
                    raise ValueError(
                        f"{where}: row {row}: {spec.answer_field!r} must be text or a number, "
                        f"not {type(value).__name__}"
                    )
        start += len(batch[column])


def chat_prompt(messages) -> tuple[str, str | None]:
    """(last user turn, system text) of a chat row; ValueError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("must be a non-empty list of {role, content} turns")
    systems, user = [], None
    for n, turn in enumerate(messages):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"turn {n}: needs a role ({', '.join(ROLES)}) and text content")
        if role == "system":
            if user is not None:
                raise ValueError(f"turn {n}: a system turn after the user turn")
            systems.append(content)
        elif role == "user":
            if user is not None:
                raise ValueError(
                    f"turn {n}: a second user turn; selfloop answers one user turn per "
                    "prompt (keep the system turns and the user turn to answer)"
                )
            user = content
        else:
            if user is None:
                raise ValueError(f"turn {n}: an assistant turn before the user turn")
            # an assistant turn after the user turn: a reference answer, ignored
    if user is None or not user.strip():
        raise ValueError("no user turn with text to answer")
    return user, ("\n\n".join(systems) if systems else None)


# -- opening ----------------------------------------------------------------------------


def _open(spec: PromptSpec):
    """(datasets.Dataset, what to name in messages)."""
    path = Path(spec.path)
    if path.is_dir():
        return _from_disk(path, spec.split), str(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in BUILDERS:
            raise ValueError(
                f"{path}: unknown prompts file type {suffix!r}; use "
                f"{', '.join(BUILDERS)}, a save_to_disk folder or a cached dataset name"
            )
        builder, options = BUILDERS[suffix]
        return _from_file(path, builder, options), str(path)
    if HUB_NAME.match(spec.path) and not path.suffix:
        return _from_cache(spec), f"dataset {spec.path!r}"
    raise ValueError(f"prompts file {spec.path!r} not found; fix the path")


def _datasets():
    import datasets

    return datasets


@contextlib.contextmanager
def _quiet_ctx():
    """datasets' progress bars and log lines off while we read (they would cut into the
    dashboard); the error we raise says what went wrong."""
    datasets = _datasets()
    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _quiet(fn):
    with _quiet_ctx():
        return fn()


def _from_file(path: Path, builder: str, options: dict):
    with _quiet_ctx() as datasets:
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as e:  # noqa: BLE001 - each failure becomes one message below
            raise ValueError(_file_error(path, builder, e)) from None


def _file_error(path: Path, builder: str, error: Exception) -> str:
    """One line for a file datasets could not read: the first bad line where there are
    lines (bad UTF-8, a line that is not JSON), else the reader's own reason."""
    if _blank(path):
        return f"{path}: no prompts in the file"
    line = _bad_line(path, builder)
    if line is not None:
        return f"{path}: line {line[0]} {line[1]}"
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    return f"{path}: cannot read it as {builder} ({type(cause).__name__}: {cause}); fix the file"


def _bad_line(path: Path, builder: str) -> tuple[int, str] | None:
    """Only on the error path: the first line that is not UTF-8 (any text format) or, for
    JSON Lines, the first line pyarrow's JSON reader refuses (the reader datasets uses)."""
    if builder == "parquet":
        return None
    import pyarrow as pa
    import pyarrow.json as pj

    jsonl = builder == "json" and not _starts_with(path, b"[")
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return number, (f"is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); save the file as UTF-8")
            if jsonl and raw.strip():
                try:
                    pj.read_json(pa.py_buffer(raw))
                except pa.ArrowInvalid as e:
                    reason = str(e).split(" in row")[0].removeprefix("JSON parse error: ")
                    return number, f"is not JSON ({reason}); write one object per line"
    return None


def _blank(path: Path) -> bool:
    with open(path, "rb") as fh:
        return all(not chunk.strip(b"\xef\xbb\xbf \t\r\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(prefix)


def _from_disk(path: Path, split: str):
    with _quiet_ctx() as datasets:
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(
                f"{path}: not a folder written by datasets' save_to_disk ({e}); give a "
                "prompts file or such a folder"
            ) from None
    return _split(data, split, str(path))


def _from_cache(spec: PromptSpec):
    """A hub dataset already in the local cache; offline, so nothing is downloaded."""
    with _quiet_ctx() as datasets:
        offline = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True
        try:
            data = datasets.load_dataset(spec.path, spec.subset)
        except Exception as e:  # noqa: BLE001 - not cached, or unreadable: one message
            raise ValueError(
                f"prompts {spec.path!r}: neither a file nor a dataset in the local datasets "
                f"cache ({datasets.config.HF_DATASETS_CACHE}) ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); fix the path, or load the "
                "dataset once with network access so it is cached"
            ) from None
        finally:
            datasets.config.HF_HUB_OFFLINE = offline
    return _split(data, spec.split, f"dataset {spec.path!r}")


def _split(data, split: str, where: str):
    if hasattr(data, "column_names") and isinstance(data.column_names, list):
        return data  # a single Dataset
    if split not in data:
        raise ValueError(f"{where}: no split {split!r}; it has {sorted(data)}: set `split`")
    return data[split]
