"""The CPU thread policy: how many threads torch uses and how idle ones wait.

Three settings, for machines that other processes share and for ones they do not:

- **Count.** ``count``: ``[model] threads`` if set, else the ``SELFLOOP_THREADS``
  environment variable, else the cores this process may run on (its CPU affinity,
  capped by a cgroup CPU quota), never torch's guess from the machine's core count.
- **Cores others use.** With the automatic count, ``Governor`` lowers torch's thread
  count to the cores that other processes leave free, measured as the run goes, and
  raises it again when they stop. A LoRA step has thousands of small parallel regions,
  each ending when its slowest thread does: two threads sharing one core with a busy
  process wait for each other at every region (the DPO update ran 9x slower beside one
  busy process), where one thread on the free core does not wait at all.
- **Waiting.** After each parallel region, torch's OpenMP runtime (libgomp) keeps idle
  threads spinning for ``GOMP_SPINCOUNT`` pauses (300,000, milliseconds, by default),
  so the next region starts at once; a sleeping thread takes tens of microseconds to
  wake. Spinning is what makes two threads fast on free cores (the DPO bench: 1.9x one
  thread, against 1.1x for threads that sleep, ``OMP_WAIT_POLICY=PASSIVE``) and what
  makes them slow beside a busy process, which the governor avoids by leaving one thread,
  which never waits. ``early_env`` bounds the spin (``EARLY_ENV``: about a millisecond)
  unless the environment sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``; libgomp reads
  them once, when torch is imported, so the CLI entry calls it first and a program that
  embeds selfloop calls it (or sets them) itself before ``import torch``.
"""

from __future__ import annotations

import math
import os
import time

from loop.errors import UserError

# Set for OpenMP before torch loads it, unless the environment sets a wait policy of its
# own (either variable): idle threads spin about a millisecond (~100,000 pauses per ms).
EARLY_ENV = {"GOMP_SPINCOUNT": "100000"}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

ENV_THREADS = "SELFLOOP_THREADS"


def early_env() -> None:
    """Put ``EARLY_ENV`` into the environment unless it names a wait policy already
    (call before torch is imported: libgomp reads its settings once, when it loads)."""
    if not any(os.environ.get(key) for key in WAIT_VARIABLES):
        os.environ.update(EARLY_ENV)


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (``cpu.max``, as containers set it); at least 1."""
    cores = len(_affinity())
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


def automatic(configured: int | None = None) -> bool:
    """True when the count is the available cores (neither configured nor in the
    environment): the governor may then lower it."""
    return not configured and not os.environ.get(ENV_THREADS, "").strip()


def apply(configured: int | None = None) -> int:
    """Set torch's intra-op thread count by ``count``; returns it."""
    import torch

    n = count(configured)
    if torch.get_num_threads() != n:
        set_threads(n)
    return n


def set_threads(n: int) -> None:
    """torch's intra-op threads (and OpenMP's and MKL's), on the calling thread. Calls
    torch's own setter: an in-process vLLM CPU engine replaces ``torch.set_num_threads``
    with a no-op once it has started (it guards a thread binding; with the
    ``VLLM_CPU_OMP_THREADS_BIND=nobind`` the vllm generator sets there is none)."""
    import torch

    torch._C.set_num_threads(int(n))


def describe() -> dict[str, object]:
    """The policy in effect, for benches and reports."""
    import torch

    gov = GOVERNOR
    return {
        "threads": torch.get_num_threads(),
        "available_cores": available_cores(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
        ENV_THREADS: os.environ.get(ENV_THREADS),
        "governor": None if gov is None else {"ceiling": gov.ceiling, "lowest": gov.lowest,
                                              "changes": gov.changes},
    }

# -- adapting the count to the cores other processes leave us ------------------------


class Governor:
    """Keeps torch's thread count at the cores other processes leave this one.

    ``tick()`` (a forward pre-hook on the policy model, so every generation step,
    training micro-batch and scoring batch passes it, on the main thread, which is the
    thread whose OpenMP settings count) reads, at most every ``interval`` seconds, the
    busy time of the cores this process may use (``/proc/stat``) and this process's own
    CPU time (``/proc/self/stat``, every thread): their difference over the interval is
    what other processes used. The thread count becomes the cores less that, rounded, at
    least 1 and at most ``ceiling`` (the count ``apply`` chose). With a competing process
    on one of two cores the update runs on one thread instead of two threads taking turns
    on one core (each parallel region waits for the slower thread); when the other
    process stops, the count goes back up.
    """

    def __init__(self, ceiling: int, interval: float = 0.25, clock=time.monotonic,
                 read=None) -> None:
        self.ceiling = ceiling
        self.interval = interval
        self.clock = clock
        self.read = read or _busy_jiffies
        self.cores = sorted(_affinity())
        self.lowest = ceiling
        self.changes = 0
        self._last = (self.clock(), *self.read(self.cores))

    def tick(self, *_args, **_kwargs) -> None:
        now = self.clock()
        if now - self._last[0] < self.interval:
            return
        busy, ours = self.read(self.cores)
        then, busy0, ours0 = self._last
        self._last = (now, busy, ours)
        others = max(0.0, ((busy - busy0) - (ours - ours0)) / _HZ / (now - then))
        want = max(1, min(self.ceiling, round(len(self.cores) - others)))
        import torch

        if want != torch.get_num_threads():
            set_threads(want)
            self.changes += 1
            self.lowest = min(self.lowest, want)


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _affinity() -> set[int]:
    """The cores this process may run on (its CPU affinity; all of them where there is none)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _busy_jiffies(cores: list[int]) -> tuple[int, int]:
    """(busy jiffies of ``cores`` since boot, this process's user + system jiffies)."""
    wanted = {f"cpu{c}" for c in cores}
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if name in wanted:
                v = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
                # user nice system idle iowait irq softirq steal (guest time is in user):
                # all but idle and iowait; a stolen slice is a core we did not get
                busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return busy, int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


# The process's governor (``govern``); None until a policy model is loaded with the
# automatic count on a machine with more than one core.
GOVERNOR: Governor | None = None


def govern(module, configured: int | None = None) -> Governor | None:
    """Adapt the thread count while ``module`` runs: a forward pre-hook on its input
    embeddings (every forward pass of a causal LM calls them as a module, whatever
    wraps the model: PEFT, generate, a chunked head) ticks the process's ``Governor``.
    Nothing when the count is fixed (``[model] threads``, ``SELFLOOP_THREADS``), on one
    core, or without ``/proc``."""
    global GOVERNOR
    ceiling = count(configured)
    if not automatic(configured) or ceiling < 2 or not os.path.exists("/proc/stat"):
        return None
    if GOVERNOR is None or GOVERNOR.ceiling != ceiling:
        GOVERNOR = Governor(ceiling)
    embed = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    (embed or module).register_forward_pre_hook(GOVERNOR.tick)
    return GOVERNOR


def tick() -> None:
    """Tick the process's governor, if any (for loops outside a governed module's
    forward: an in-process vLLM engine's calls)."""
    if GOVERNOR is not None:
        GOVERNOR.tick()
