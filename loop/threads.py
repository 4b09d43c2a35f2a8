"""The CPU thread policy: how many threads torch uses and how idle ones wait.

Two settings, both for machines that other processes share:

- **Waiting.** torch's OpenMP runtime (libgomp) by default keeps an idle thread spinning
  for a long while (``GOMP_SPINCOUNT`` 300,000 pauses: milliseconds) after each parallel
  region. With a competing process on the cores, a spinning thread holds a core that the
  thread it waits for needs, and every one of the thousands of small parallel regions of
  a LoRA step can stall for a scheduler slice: the DPO update ran 9x slower beside one
  busy process. ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep at once. libgomp
  reads it when torch is imported, so ``early_env`` sets it (unless the environment
  already has it) in the CLI entry before anything imports torch; a program that embeds
  selfloop sets it itself (``OMP_WAIT_POLICY=ACTIVE`` restores spinning).
- **Count.** ``count``: ``[model] threads`` if set, else the ``SELFLOOP_THREADS``
  environment variable, else the cores this process may run on (its CPU affinity,
  capped by a cgroup CPU quota), never torch's guess from the machine's core count.
"""

from __future__ import annotations

import math
import os

from loop.errors import UserError

# Set for OpenMP before torch loads it, each only if the environment does not set it.
EARLY_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

ENV_THREADS = "SELFLOOP_THREADS"


def early_env() -> None:
    """Put ``EARLY_ENV`` into the environment where it is not set (call before torch is
    imported: libgomp reads its settings once, when it loads)."""
    for key, value in EARLY_ENV.items():
        os.environ.setdefault(key, value)


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (``cpu.max``, as containers set it); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def count(configured: int | None = None) -> int:
    """torch's thread count: ``configured`` (``[model] threads``), else
    ``SELFLOOP_THREADS``, else ``available_cores()``."""
    if configured:
        return int(configured)
    raw = os.environ.get(ENV_THREADS, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise UserError(
                f"{ENV_THREADS}={raw!r}: give a whole number of threads of at least 1, "
                "or unset it to use the available cores"
            )
        return value
    return available_cores()


def apply(configured: int | None = None) -> int:
    """Set torch's intra-op thread count by ``count``; returns it."""
    import torch

    n = count(configured)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def describe() -> dict[str, object]:
    """The policy in effect, for benches and reports."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "available_cores": available_cores(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        ENV_THREADS: os.environ.get(ENV_THREADS),
    }
