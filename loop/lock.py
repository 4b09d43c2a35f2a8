"""One writer per run directory: an advisory lock on ``<run_dir>/lock``.

The lock is an ``fcntl.flock`` on an open file, so the kernel releases it when the
holder dies, SIGKILL included: a lock file left by a dead process is stale and is taken
over. The file holds the holder's pid and start time, for the error message.

Readers (``status``, ``watch``) tell a live writer from a dead one with ``writer_alive``:
a non-blocking shared ``flock`` on the same file succeeds only when no process holds
the writer's lock. The probe holds it for an instant, so ``acquire`` retries a moment
before calling the run locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
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
            for attempt in range(20):  # a reader's probe holds it for microseconds
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 19:
                        raise
                    time.sleep(0.01)
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
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
            fh.flush()
        except OSError:  # a full disk: hold nothing, say so (loop/diskfull.py)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            try:
                fh.close()
            except OSError:
                pass
            raise
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


def read_holder(run_dir: Path) -> dict:
    """The note in ``<run_dir>/lock``: the last holder's pid and start ({} if unreadable)."""
    try:
        data = json.loads((Path(run_dir) / "lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def writer_alive(run_dir: Path) -> bool:
    """Whether a live process holds the run's writer lock (for status/watch readers)."""
    try:
        fd = os.open(Path(run_dir) / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock at once
    return False
