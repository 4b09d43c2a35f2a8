"""glibc malloc settings for tensor work: keep freed tensor memory for the next tensor.

torch's CPU tensors come from the C library's ``malloc``. glibc serves a block above its
mmap threshold (128 KiB at first, raised as such blocks are freed, at most 32 MiB) with a
fresh ``mmap`` and hands it back to the kernel when it is freed, and it gives memory
at the top of the heap back whenever more than the trim threshold is free there. A
tensor made again after that touches new pages, one page fault each (the kernel zeroes
every 4 KiB page): the demo's judge phase (generation, label passes) took 190,000-330,000
faults per round and about a second of system CPU time per run for it.

``tune`` sets, through ``mallopt``, a 64 MiB mmap threshold (``SETTINGS``), so blocks up
to that come from the heap and are reused, a 256 MiB trim threshold and 64 MiB of top
padding, so the heap does not shrink and grow again between batches. On the two-round
cai_demo (``python bench/malloc.py``): minor faults 660,000-740,000 -> 136,000-140,000,
system CPU 1.9-2.3 s -> 0.7-0.8 s, the judge phase 1.26x and the update 1.09x faster,
peak RSS 622-639 -> 641-656 MB. The cost: up to the trim threshold of freed memory
stays with the process instead of going back to the system. The CLI calls ``tune``
before the first tensors and ``Policy`` when it loads the model (for programs that
embed selfloop); it is a process-wide setting, done once.

It leaves glibc alone when the environment tunes it already (any ``MALLOC_*_`` variable
in ``ENV_TUNABLES`` or a ``glibc.malloc`` entry in ``GLIBC_TUNABLES``), when the C library
is not glibc, and when ``SELFLOOP_MALLOC=default`` (``tuned``, or unset: tune it; any other
value is refused, naming the variable).
"""

from __future__ import annotations

import ctypes
import os

from loop.errors import UserError

MIB = 1 << 20
# mallopt parameters (malloc.h) and the values tune() gives them.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {M_MMAP_THRESHOLD: 64 * MIB, M_TRIM_THRESHOLD: 256 * MIB, M_TOP_PAD: 64 * MIB}
NAMES = {M_MMAP_THRESHOLD: "mmap_threshold", M_TRIM_THRESHOLD: "trim_threshold",
         M_TOP_PAD: "top_pad"}
# glibc's own environment variables for the same settings: set, they win.
ENV_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")
ENV_SWITCH = "SELFLOOP_MALLOC"

_state: dict | None = None


def _skip_reason() -> str | None:
    switch = os.environ.get(ENV_SWITCH, "").strip()
    if switch == "default":
        return f"{ENV_SWITCH}=default"
    if switch not in ("", "tuned"):
        raise UserError(f"{ENV_SWITCH}={switch!r}: give `default` (glibc's own malloc settings) "
                        "or `tuned` (selfloop's, the same as unset)")
    named = [k for k in ENV_TUNABLES if os.environ.get(k)]
    if named or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"the environment tunes malloc ({', '.join(named) or 'GLIBC_TUNABLES'})"
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return "the C library is not glibc"
    return None


def tune() -> dict:
    """Apply ``SETTINGS`` once per process (later calls return the first result):
    ``{"tuned": bool, "why": str | None, settings...}``. Raises ``UserError`` for a
    ``SELFLOOP_MALLOC`` that is neither ``default`` nor ``tuned``."""
    global _state
    if _state is not None:
        return _state
    why = _skip_reason()
    if why is None:
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            if not all(mallopt(param, value) == 1 for param, value in SETTINGS.items()):
                why = "mallopt refused a setting"
        except (OSError, AttributeError):
            why = "no mallopt in this C library"
    _state = {"tuned": why is None, "why": why}
    if why is None:
        _state.update({NAMES[p]: v for p, v in SETTINGS.items()})
    return _state


def describe() -> dict:
    """What ``tune`` did in this process (``{"tuned": None}`` before it ran)."""
    return dict(_state) if _state is not None else {"tuned": None, "why": "not called"}
