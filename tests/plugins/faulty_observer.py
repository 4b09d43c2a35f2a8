"""An observer that raises RuntimeError in the lifecycle hooks named by ``FAULTY_HOOKS``
and calls sys.exit(3) in those named by ``FAULTY_EXITS`` (comma lists), for
tests/test_blame.py."""

from __future__ import annotations

import os
import sys

import loop


def _fail(hook: str) -> None:
    if hook in os.environ.get("FAULTY_EXITS", "").split(","):
        sys.exit(3)
    if hook in os.environ.get("FAULTY_HOOKS", "").split(","):
        raise RuntimeError(f"observer broke in {hook}")


@loop.hookimpl
def run_start(run):
    _fail("run_start")


@loop.hookimpl
def round_start(run, round):
    _fail("round_start")


@loop.hookimpl
def phase_start(run, round, phase):
    _fail("phase_start")


@loop.hookimpl
def progress(run, round, phase, done, total, metrics):
    _fail("progress")


@loop.hookimpl
def phase_end(run, round, phase, status, seconds):
    _fail("phase_end")


@loop.hookimpl
def round_end(run, round, metrics):
    _fail("round_end")


@loop.hookimpl
def event(run, round, phase, level, message, data):
    _fail("event")


@loop.hookimpl
def run_end(run, status):
    _fail("run_end")
