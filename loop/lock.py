"""One writer per run directory: an advisory lock on ``<run_dir>/lock``.

The lock is an ``fcntl.flock`` on an open file, so the kernel releases it when the
holder dies, SIGKILL included: a lock file left by a dead process is stale and is taken
over. The file holds the holder's pid and start time, for the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from loop.errors import RunLocked


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "lock"
        self._fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                holder = json.loads(fh.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            fh.close()
            raise RunLocked(
                f"{self.path.parent}: another selfloop process (pid {holder.get('pid', '?')}, "
                f"since {holder.get('since', '?')}) is writing this run; wait for it to finish "
                "or stop it, then resume"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
