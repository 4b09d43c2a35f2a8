"""A full disk: recognised wherever it surfaces, told in one line, recorded truthfully.

It surfaces as ``OSError`` ENOSPC/EDQUOT (the lock file, config.json, an adapter), as
SQLite's "database or disk is full" or "disk I/O error" (a commit, the WAL), or as a
library's own error carrying "No space left on device" (safetensors, torch). ``is_disk_full``
looks through an exception's causes for any of these.

So that a run can still record how it ended, the writer keeps a reserve while it runs:
``<run_dir>/.reserve``, 1 MiB of zeros on the run folder's filesystem. When the disk fills
the runner deletes it and so has room to mark the phase and the run ``failed`` with the
reason; the reserve is made again when the run resumes and removed when it ends.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from loop.errors import SelfloopError

RESERVE_FILE = ".reserve"
RESERVE_BYTES = 1 << 20
_SQLITE_FULL = ("database or disk is full", "disk i/o error")


class DiskFull(SelfloopError):
    """No space left where a run writes. Exit code 1; free space, then resume."""


def is_disk_full(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error).lower()
        if isinstance(error, sqlite3.Error) and any(s in text for s in _SQLITE_FULL):
            return True
        if "no space left on device" in text:
            return True
        error = getattr(error, "error", None) or error.__cause__ or error.__context__
    return False


def disk_full(folder: Path | str, doing: str, then: str) -> DiskFull:
    return DiskFull(f"{folder}: no space left on the device while {doing}; free space "
                    f"there (df -h {folder}), then {then}")


class Reserve:
    """The writer's reserve in a run folder (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / RESERVE_FILE

    def make(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
            f.flush()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
