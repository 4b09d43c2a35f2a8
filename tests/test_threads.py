"""The CPU thread policy (loop/threads.py): the OpenMP wait policy set before torch loads
libgomp, and the thread count from config, environment or the available cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loop.cli
from loop import threads
from loop.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def libgomp_settings(extra_env: dict[str, str]) -> str:
    """What torch's libgomp reports (OMP_DISPLAY_ENV=verbose) when loaded after early_env()."""
    # A minimal environment: nothing a worker's earlier tests left behind reaches libgomp.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(PYTHONPATH=str(ROOT), OMP_DISPLAY_ENV="verbose", **extra_env)
    code = ("import os, sys; from loop.threads import early_env; early_env(); "
            "print('child sees', {k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')},"
            " 'torch loaded before:', 'torch' in sys.modules, file=sys.stderr); import torch")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return proc.stderr


def test_idle_threads_spin_a_bounded_while_unless_the_user_says_otherwise():
    shown = libgomp_settings({})
    assert "GOMP_SPINCOUNT = '100000'" in shown, shown
    told = libgomp_settings({"OMP_WAIT_POLICY": "passive"})
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in told and "GOMP_SPINCOUNT = '0'" in told
    assert "GOMP_SPINCOUNT = '3000'" in libgomp_settings({"GOMP_SPINCOUNT": "3000"})


def test_the_cli_entry_sets_the_wait_policy_before_any_command_runs(monkeypatch):
    for key in threads.WAIT_VARIABLES:
        monkeypatch.setenv(key, "")  # recorded, so the test's own setting is undone after it
        monkeypatch.delenv(key)
    seen = []
    monkeypatch.setattr(loop.cli, "cli", lambda: seen.append(os.environ.get("GOMP_SPINCOUNT")))
    loop.cli.main()
    assert seen == [threads.EARLY_ENV["GOMP_SPINCOUNT"]]


def test_thread_count_from_config_then_environment_then_cores(monkeypatch):
    monkeypatch.delenv(threads.ENV_THREADS, raising=False)
    assert threads.count() == threads.available_cores()
    assert 1 <= threads.available_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv(threads.ENV_THREADS, "3")
    assert threads.count() == 3
    assert threads.count(5) == 5  # [model] threads wins
    for bad in ("0", "two"):
        monkeypatch.setenv(threads.ENV_THREADS, bad)
        with pytest.raises(UserError, match="SELFLOOP_THREADS"):
            threads.count()


def test_policy_applies_the_count_when_it_loads(tiny_model_dir, monkeypatch):
    from loop.policy import Policy

    before = torch.get_num_threads()
    monkeypatch.setenv(threads.ENV_THREADS, "1")
    try:
        assert Policy(str(tiny_model_dir), device="cpu").base is not None
        assert torch.get_num_threads() == 1
        assert Policy(str(tiny_model_dir), device="cpu", threads=2).base is not None
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class FakeCores:
    """/proc/stat and /proc/self/stat for the governor: ``others`` cores busy with other
    processes and ``ours`` with this one, advancing with a fake clock."""

    def __init__(self):
        self.now, self.busy, self.mine = 0.0, 0, 0
        self.others, self.ours = 0.0, 2.0

    def clock(self):
        return self.now

    def read(self, cores):
        return self.busy, self.mine

    def advance(self, seconds: float):
        self.now += seconds
        self.busy += round((self.others + self.ours) * seconds * threads._HZ)
        self.mine += round(self.ours * seconds * threads._HZ)


def test_the_governor_follows_the_cores_others_leave_free():
    before = torch.get_num_threads()
    fake = FakeCores()
    gov = threads.Governor(2, interval=0.25, clock=fake.clock, read=fake.read)
    try:
        torch.set_num_threads(2)
        fake.advance(1.0)
        gov.tick()
        assert torch.get_num_threads() == 2  # nobody else: both cores
        fake.others, fake.ours = 1.0, 1.0  # a busy process takes one core
        fake.advance(0.1)
        gov.tick()
        assert torch.get_num_threads() == 2  # within the interval: not measured yet
        fake.advance(0.5)
        gov.tick()
        assert torch.get_num_threads() == 1
        fake.others = 3.0  # more than the cores: still one thread
        fake.advance(0.5)
        gov.tick()
        assert torch.get_num_threads() == 1
        fake.others, fake.ours = 0.0, 1.0  # it stopped
        fake.advance(0.5)
        gov.tick()
        assert torch.get_num_threads() == 2 and gov.lowest == 1 and gov.changes == 2
    finally:
        torch.set_num_threads(before)


def test_the_real_counters_see_a_busy_process(tmp_path):
    """/proc, for real: a process spinning on one of our cores shows as about one core
    used by others (at least half of one; the other xdist worker may add more)."""
    cores = sorted(os.sched_getaffinity(0))
    busy0, ours0 = threads._busy_jiffies(cores)
    spinner = subprocess.Popen([sys.executable, "-c", f"import os, time; os.sched_setaffinity(0, {{{cores[-1]}}})\n"
                                "end = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        import time

        time.sleep(1.5)
        busy1, ours1 = threads._busy_jiffies(cores)
    finally:
        spinner.kill()
        spinner.wait()
    others = ((busy1 - busy0) - (ours1 - ours0)) / threads._HZ / 1.5
    assert others >= 0.5


def test_a_governed_policy_drops_to_one_thread_beside_a_busy_process(tiny_model_dir, monkeypatch):
    """The policy model's forward passes tick the governor: beside a process spinning on
    one of two cores, the automatic count becomes 1."""
    from loop.policy import Policy

    if threads.available_cores() < 2:
        pytest.skip("needs two cores")
    monkeypatch.delenv(threads.ENV_THREADS, raising=False)
    monkeypatch.setattr(threads, "GOVERNOR", None)
    before = torch.get_num_threads()
    cores = sorted(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cores[-1]}}})\n"
                                "while True: pass"])
    try:
        policy = Policy(str(tiny_model_dir), device="cpu")
        model = policy.base
        gov = threads.GOVERNOR
        assert gov is not None and gov.ceiling == threads.available_cores()
        ids = torch.ones(1, 8, dtype=torch.long)
        import time

        end = time.monotonic() + 10
        while time.monotonic() < end and torch.get_num_threads() > 1:
            with torch.no_grad():
                model(input_ids=ids)
            time.sleep(0.05)
        assert torch.get_num_threads() == 1 and gov.lowest == 1
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(before)


def test_a_fixed_count_is_not_governed(tiny_model_dir, monkeypatch):
    from loop.policy import Policy

    monkeypatch.setattr(threads, "GOVERNOR", None)
    monkeypatch.setenv(threads.ENV_THREADS, "2")
    before = torch.get_num_threads()
    try:
        Policy(str(tiny_model_dir), device="cpu").base
        assert threads.GOVERNOR is None
        Policy(str(tiny_model_dir), device="cpu", threads=2).base
        assert threads.GOVERNOR is None
    finally:
        torch.set_num_threads(before)
