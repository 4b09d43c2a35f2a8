"""Observers chosen in the config (``[[observers]]``), attached to the lifecycle hooks.

Each enabled ``loop.Observer`` is wrapped in an ``ObserverGuard`` and registered with the
plugin manager for the length of one run (``attach`` ... ``detach``), so it sees exactly
the hooks every other plugin sees. The guard is the promise that a tracker never fails a
run: the first exception an observer raises switches it off for the rest of the run and
is stored as a warning event naming it (label and plugin); the run goes on.
"""

from __future__ import annotations

import traceback
from typing import Callable

from loop import plugins
from loop.components import Observer
from loop.hookspecs import hookimpl

# Emit(round, phase, level, message, data, *, plugin): the runner's event writer.
Emit = Callable[..., None]


class ObserverGuard:
    """Forwards each lifecycle hook to one observer; a failure switches it off."""

    def __init__(self, observer: Observer, emit: Emit):
        self.observer = observer
        self.emit = emit
        self.failed: str | None = None  # the first failure, once switched off

    def _call(self, hook: str, **kwargs) -> None:
        if self.failed is not None:
            return
        if hook == "event" and kwargs.get("data", {}).get("observer") == self.observer.label:
            return  # its own failure report
        try:
            getattr(self.observer, hook)(**kwargs)
        except Exception as e:  # noqa: BLE001 - an observer must never fail the run
            obs = self.observer
            self.failed = f"{type(e).__name__}: {e}"
            message = (f"observer {obs.label!r} (plugin {obs.plugin}) failed in {hook}: "
                       f"{self.failed}; it is switched off for the rest of the run")
            try:
                obs.close()
            except Exception:  # noqa: BLE001 - closing a broken tracker may fail too
                pass
            self.emit(kwargs.get("round"), kwargs.get("phase"), "warning", message,
                      {"observer": obs.label, "hook": hook, "traceback": traceback.format_exc()},
                      plugin=obs.plugin)

    @hookimpl
    def run_start(self, run):
        self._call("run_start", run=run)

    @hookimpl
    def round_start(self, run, round):
        self._call("round_start", run=run, round=round)

    @hookimpl
    def phase_start(self, run, round, phase):
        self._call("phase_start", run=run, round=round, phase=phase)

    @hookimpl
    def progress(self, run, round, phase, done, total, metrics):
        self._call("progress", run=run, round=round, phase=phase, done=done,
                   total=total, metrics=metrics)

    @hookimpl
    def phase_end(self, run, round, phase, status, seconds):
        self._call("phase_end", run=run, round=round, phase=phase, status=status,
                   seconds=seconds)

    @hookimpl
    def round_end(self, run, round, metrics):
        self._call("round_end", run=run, round=round, metrics=metrics)

    @hookimpl
    def event(self, run, round, phase, level, message, data):
        self._call("event", run=run, round=round, phase=phase, level=level,
                   message=message, data=data)

    @hookimpl
    def run_end(self, run, status):
        self._call("run_end", run=run, status=status)


def attach(observers: list[Observer], emit: Emit) -> list[str]:
    """Register a guard per observer; returns the names to ``detach``."""
    names = []
    for i, obs in enumerate(observers):
        names.append(plugins.register(ObserverGuard(obs, emit), name=f"observer:{i}:{obs.label}"))
    return names


def detach(names: list[str]) -> None:
    for name in names:
        if plugins.get_manager().get_plugin(name) is not None:
            plugins.unregister(name=name)
