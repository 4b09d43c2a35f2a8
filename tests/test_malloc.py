"""loop/malloc.py against the real glibc: page faults counted by the kernel, in children
started with and without the settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loop import malloc
from tests.core_helpers import cli, env

# Make and free a 40 MiB tensor (above glibc's largest automatic mmap threshold, 32 MiB,
# below ours) and count the page faults of a cycle, once the heap has settled.
PROBE = r"""
import json, resource, sys
from loop import malloc
state = malloc.tune()
again = malloc.tune()
import torch
n = 40 * (1 << 20) // 4
for _ in range(10):  # the heap settles in the first few cycles
    x = torch.ones(n)
    del x
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(n)
    del x
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10
print(json.dumps({"state": state, "same": again is state, "faults": faults}))
"""

needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def probe(**extra) -> dict:
    e = env(**extra)
    for key in (malloc.ENV_SWITCH, *malloc.ENV_TUNABLES, "GLIBC_TUNABLES"):
        if key not in extra:
            e.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=e, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    tuned, default = probe(), probe(SELFLOOP_MALLOC="default")
    assert tuned["state"] == {"tuned": True, "why": None, "mmap_threshold": 64 << 20,
                              "trim_threshold": 256 << 20, "top_pad": 64 << 20}
    assert tuned["same"]  # once per process
    assert default["state"] == {"tuned": False, "why": "SELFLOOP_MALLOC=default"}
    # glibc's default maps each 40 MiB block afresh: one fault per 4 KiB page (10,240)
    assert default["faults"] > 5000
    assert tuned["faults"] < default["faults"] / 10, (tuned, default)


@needs_glibc
@pytest.mark.parametrize("extra,why", [
    ({"MALLOC_ARENA_MAX": "2"}, "the environment tunes malloc (MALLOC_ARENA_MAX)"),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "the environment tunes malloc (MALLOC_MMAP_THRESHOLD_)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"}, "the environment tunes malloc (GLIBC_TUNABLES)"),
])
def test_a_malloc_the_environment_tunes_is_left_alone(extra, why):
    got = probe(**extra)
    assert got["state"] == {"tuned": False, "why": why}
    if "MALLOC_MMAP_THRESHOLD_" in extra:  # the user's 128 KiB threshold holds: faults
        assert got["faults"] > 5000


def test_the_cli_and_the_policy_tune_it(tiny_model_dir):
    code = ("import sys; from loop import cli, malloc\n"
            "sys.argv = ['selfloop', '--version']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(malloc.describe()['tuned'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "True", proc.stderr
    code = (f"from loop import malloc; from loop.policy import Policy\n"
            f"print(malloc.describe()['tuned'])\n"
            f"Policy({str(tiny_model_dir)!r}, device='cpu').base\n"
            f"print(malloc.describe()['tuned'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["None", "True"], proc.stderr


def test_a_bad_switch_is_refused_naming_it():
    proc = cli("--version", SELFLOOP_MALLOC="off")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "Error: SELFLOOP_MALLOC='off': give `default` (glibc's own malloc settings) or `tuned` "
        "(selfloop's, the same as unset)"]
    assert probe(SELFLOOP_MALLOC="tuned")["state"]["tuned"] is True
