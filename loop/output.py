"""Writing a user-named output file safely (``selfloop export -o FILE``).

Three rules, so that an export can never cost a run its data:

1. Never inside a run folder (any folder holding a ``run.db``, or one the caller
   protects): ``-o runs/NAME/run.db`` would replace the database.
2. Never over an existing file unless asked (``--force``).
3. Atomic: written to a temp file beside the target, flushed, then renamed over it, so a
   failure or a kill half-way leaves the old file (or nothing), never half a file.

``open_output("-")`` is stdout.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from loop.errors import UserError

RUN_MARKER = "run.db"  # what makes a folder a run folder


def check_output(path: str | Path, *, force: bool = False, protect: tuple = ()) -> Path:
    """The resolved target, or a UserError naming the file and the fix."""
    target = Path(path).expanduser()
    resolved = target.resolve()  # symlinks followed: a link into a run folder is refused too
    protected = [Path(p).resolve() for p in protect]
    for folder in resolved.parents:
        if folder in protected or (folder / RUN_MARKER).is_file():
            raise UserError(
                f"{path}: is inside the run folder {folder}; write the export somewhere "
                "else (a run folder holds only what the run writes)"
            )
    if resolved.is_dir():
        raise UserError(f"{path}: is a folder; give a file name, e.g. {Path(path) / 'pairs.jsonl'}")
    if resolved.exists() and not force:
        raise UserError(f"{path}: already exists; choose another name, or pass --force to replace it")
    if not resolved.parent.is_dir():
        raise UserError(f"{path}: folder {resolved.parent} does not exist; create it first")
    return resolved


@contextmanager
def open_output(path: str | Path, *, force: bool = False, protect: tuple = (),
                binary: bool = False) -> Iterator[IO]:
    """``with open_output(path) as out: out.write(...)``: checked, then written atomically
    (``binary``: a bytes file, e.g. for Parquet)."""
    if str(path) == "-":
        yield sys.stdout.buffer if binary else sys.stdout
        return
    target = check_output(path, force=force, protect=protect)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
