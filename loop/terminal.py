"""The terminal while a run holds it: no foreign progress bars, stderr to the run's log,
and a closed pipe that never fails a phase.

    with terminal.Session(live=True) as term:   # the rich dashboard holds the terminal
        ...                                     # (seed-model build: stderr in a temp file)
        term.log_to(run_dir / "run.log")        # once the run folder exists

1. Progress bars of other libraries are off for the length of a run, in every mode (the
   monitor shows progress): tqdm (``TQDM_DISABLE``), huggingface_hub's and transformers'
   ("Loading weights"). Their settings are restored afterwards.
2. With the live dashboard, everything written to stderr goes to ``<run>/run.log``:
   Python warnings, library logging (transformers, torch, vLLM's console handler), and
   C libraries writing to file descriptor 2. The descriptor itself is redirected, so a
   handler that kept the original ``sys.stderr`` cannot draw over the dashboard either.
   Before the run folder exists (the seed-model build) the text goes to a temporary file,
   moved into run.log by ``log_to``. ``held()`` tells a component that the terminal is
   the dashboard's (the vLLM generator then drops its console handler).
3. ``sys.stdout`` and ``sys.stderr`` are wrapped so that the first ``BrokenPipeError``
   (``selfloop run ... | head``) switches that stream to /dev/null instead of failing the
   phase that happened to print.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

LOG_FILE = "run.log"

_held = False


def held() -> bool:
    """True while the live dashboard holds the terminal (stderr goes to the run's log)."""
    return _held


class PipeSafe:
    """A text stream whose first BrokenPipeError sends it (and its descriptor) to /dev/null."""

    def __init__(self, stream):
        self._stream = stream
        self.closed_pipe = False

    def _broken(self) -> None:
        self.closed_pipe = True
        try:  # later writes, and the interpreter's flush at exit, land in /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text):
        if self.closed_pipe and not _has_fd(self._stream):
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._broken()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._broken()
        except ValueError:  # closed
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _has_fd(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (OSError, ValueError, AttributeError):
        return False


class Session:
    """What a run does to the terminal, undone on exit (see the module docstring)."""

    def __init__(self, live: bool = False):
        self.live = live
        self._env: dict[str, str | None] = {}
        self._bars: list = []
        self._streams: list[tuple[str, object]] = []
        self._saved_fd: int | None = None
        self._log_fd: int | None = None
        self._tmp: str | None = None
        self.log_path: Path | None = None

    # -- entering and leaving ------------------------------------------------------

    def __enter__(self):
        self._bars_off()
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, PipeSafe):
                self._streams.append((name, stream))
                setattr(sys, name, PipeSafe(stream))
        if self.live:
            self._redirect_stderr()
        return self

    def __exit__(self, *exc):
        self._restore_stderr()
        for name, stream in reversed(self._streams):
            setattr(sys, name, stream)
        self._streams.clear()
        self._bars_on()
        return False

    # -- 1. progress bars ----------------------------------------------------------

    def _bars_off(self) -> None:
        for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
            self._env[key] = os.environ.get(key)
            os.environ[key] = "1"
        # Libraries already imported read their switch at import time: flip it too.
        hub = sys.modules.get("huggingface_hub.utils")
        if hub is not None and hasattr(hub, "disable_progress_bars"):
            was = hub.are_progress_bars_disabled()
            hub.disable_progress_bars()
            self._bars.append(lambda: None if was else hub.enable_progress_bars())
        tf = sys.modules.get("transformers.utils.logging")
        if tf is not None and hasattr(tf, "disable_progress_bar"):
            was = tf.is_progress_bar_enabled()
            tf.disable_progress_bar()
            self._bars.append(lambda: tf.enable_progress_bar() if was else None)

    def _bars_on(self) -> None:
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._env.clear()
        with warnings.catch_warnings():
            # huggingface_hub warns when its import-time copy of the variable says "off"
            warnings.simplefilter("ignore")
            for undo in reversed(self._bars):
                try:
                    undo()
                except Exception:  # restoring a third party's switch must not hide the outcome
                    pass
        self._bars.clear()

    # -- 2. stderr to the run's log ------------------------------------------------

    def _redirect_stderr(self) -> None:
        global _held
        try:
            fd = sys.__stderr__.fileno()
        except (OSError, ValueError, AttributeError):
            return  # no descriptor to redirect (embedded); leave stderr alone
        fd_tmp, self._tmp = tempfile.mkstemp(prefix="selfloop-", suffix=".log")
        _flush_stderr()
        self._saved_fd = os.dup(fd)
        os.dup2(fd_tmp, fd)
        self._log_fd = fd_tmp
        _held = True

    def log_to(self, path: str | Path) -> None:
        """From now on stderr goes to ``path`` (appended), with what was kept until now."""
        path = Path(path)
        self.log_path = path
        if self._saved_fd is None:
            return
        _flush_stderr()
        new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._tmp is not None:
            with open(self._tmp, "rb") as f:
                while chunk := f.read(1 << 16):
                    os.write(new, chunk)
        os.dup2(new, sys.__stderr__.fileno())
        self._close_log()
        self._log_fd = new

    def _close_log(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None

    def _restore_stderr(self) -> None:
        global _held
        if self._saved_fd is None:
            return
        _flush_stderr()
        os.dup2(self._saved_fd, sys.__stderr__.fileno())
        os.close(self._saved_fd)
        self._saved_fd = None
        self._close_log()
        _held = False


def _flush_stderr() -> None:
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
