"""One writer per run folder.

The exclusion is an ``fcntl.flock`` on the run folder itself (its directory file
descriptor), held for as long as the process writes. It cannot be side-stepped by
deleting or replacing a file inside the folder, and the kernel releases it when the
holder dies, SIGKILL included, so a run left by a dead process is simply taken over.

``<run_dir>/lock`` is only a note for people and readers: the holder's pid and start
time, used in the "another process is writing" message. It is replaced atomically
(written beside, then renamed), so a ``lock`` that is a symlink is replaced, never
written through. The writer also holds a flock on that file, for older readers that
probe it; ``writer_alive`` asks the folder lock, which is the one that counts.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from loop.errors import RunLocked

LOCK_FILE = "lock"
# A reader's probe (``writer_alive``) holds the folder lock for microseconds: a writer
# starting at that instant retries for this long before saying the run is busy.
ACQUIRE_PATIENCE_S = 1.0


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._dir_fd: int | None = None
        self._file_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._dir_fd is not None

    def acquire(self) -> None:
        if self.held:
            return
        fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        deadline = time.monotonic() + ACQUIRE_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                holder = read_holder(self.run_dir)
                raise RunLocked(
                    f"{self.run_dir}: another selfloop process (pid {holder.get('pid', '?')}, "
                    f"since {holder.get('since', '?')}) is writing this run; wait for it to "
                    "finish or stop it, then resume"
                ) from None
        self._dir_fd = fd
        try:
            self._write_note()
        except BaseException:
            self.release()
            raise

    def _write_note(self) -> None:
        note = {"pid": os.getpid(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = self.run_dir / f".{LOCK_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(note))
        os.replace(tmp, self.path)  # replaces a symlink itself, never its target
        self._file_fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fcntl.flock(self._file_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # an older selfloop probing it; the folder lock counts
            pass

    def release(self) -> None:
        for name in ("_file_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)
                setattr(self, name, None)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def read_holder(run_dir: Path) -> dict:
    """The note in ``<run_dir>/lock`` ({} if missing, unreadable, or not a regular file)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "r") as fh:
            data = json.loads(fh.read(4096) or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def writer_alive(run_dir: Path) -> bool:
    """Whether a live process holds the run's writer lock (for status/watch readers)."""
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock at once
    return False
