"""Stopping a run at a safe point: stop signals and the per-phase deadline.

SIGINT (Ctrl-C), SIGTERM and SIGHUP (what Kubernetes, systemd, SLURM and a closed
terminal send) are handled alike:

1. the first asks for a stop: the runner finishes and commits the current phase, marks
   the run ``interrupted`` and prints how to resume it;
2. the second stops now: ``StopNow`` is raised in the main thread wherever it is; the
   phase is marked ``interrupted``, its partial rows are never committed, and resume
   re-runs it from scratch;
3. a third restores the signal's default action and re-sends it (a process stuck while
   cleaning up still dies).

``[runner] phase_timeout_s`` gives each phase a deadline. In the main thread it is a
``SIGALRM`` timer (``signal.setitimer``) whose handler raises ``PhaseTimeout``: Python
runs signal handlers between bytecodes, so the exception lands where the interpreter is
consistent, and the signal also cuts blocking waits short (sockets, sleeps, futures). The
timer runs only while the phase's components run and is disarmed before the phase's
commit, so a timeout never cuts a transaction; the run then stops (whatever a component
held goes with the process) and resume re-runs the phase. A long C call (one big matmul)
is interrupted when it returns. Where signals cannot be used (a runner off the main
thread) the deadline is checked at every progress report and when the phase's work returns.

Both exceptions derive from ``BaseException``, so a component's ``except Exception``
cannot swallow them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopNow(KeyboardInterrupt):
    """The second stop signal: stop at once. ``args[0]`` is the signal's name."""


class PhaseTimeout(BaseException):
    """The phase ran past ``[runner] phase_timeout_s``."""

    def __init__(self, limit: float):
        self.limit = limit
        super().__init__(f"ran past [runner] phase_timeout_s = {limit:g} s")


class Interrupts:
    """Installed by the runner for the length of a run (main thread only)."""

    def __init__(self, on_first: Callable[[str], None]):
        self._on_first = on_first
        self.requested: str | None = None  # the first stop signal's name, once one came
        self.count = 0
        self._old: dict[int, object] = {}
        self._limit: float | None = None
        self._deadline: float | None = None  # time.monotonic() value
        self._alarm_old = None
        self._alarm_armed = False
        self._timer_old = (0.0, 0.0)

    @staticmethod
    def _main_thread() -> bool:
        return threading.current_thread() is threading.main_thread()

    def install(self) -> None:
        if not self._main_thread():
            return
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._on_signal)

    def restore(self) -> None:
        self.disarm()
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.count += 1
        if self.count == 1:
            self.requested = name
            self._on_first(name)
        elif self.count == 2:
            raise StopNow(name)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    # -- the phase deadline --------------------------------------------------------

    def arm(self, seconds: float | None) -> None:
        self.disarm()
        if not seconds:
            return
        self._limit = seconds
        self._deadline = time.monotonic() + seconds
        if self._main_thread():
            self._alarm_old = signal.signal(signal.SIGALRM, self._on_alarm)
            self._alarm_armed = True
            # Someone else's timer (pytest-timeout, say) is put back, less the time spent.
            self._timer_old = (signal.setitimer(signal.ITIMER_REAL, seconds)[0], time.monotonic())

    def disarm(self) -> None:
        self._deadline = None
        if self._alarm_armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            old = self._alarm_old
            signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)
            self._alarm_old, self._alarm_armed = None, False
            left, since = self._timer_old
            if left > 0:
                signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - since), 0.001))

    def _on_alarm(self, signum, frame) -> None:
        if self._deadline is not None:
            self._deadline = None  # raise once
            raise PhaseTimeout(self._limit)

    def check(self) -> None:
        """Raise ``PhaseTimeout`` if the deadline has passed (progress reports call it)."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            self._deadline = None
            raise PhaseTimeout(self._limit)
