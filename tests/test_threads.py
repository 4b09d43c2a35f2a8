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
    """What torch's libgomp reports (OMP_DISPLAY_ENV) when loaded after early_env()."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=str(ROOT), OMP_DISPLAY_ENV="true", **extra_env)
    code = "from loop.threads import early_env; early_env(); import torch"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    return proc.stderr


def test_idle_threads_sleep_unless_the_user_says_otherwise():
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in libgomp_settings({})
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in libgomp_settings({"OMP_WAIT_POLICY": "active"})


def test_the_cli_entry_sets_the_wait_policy_before_any_command_runs(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen = []
    monkeypatch.setattr(loop.cli, "cli", lambda: seen.append(os.environ.get("OMP_WAIT_POLICY")))
    loop.cli.main()
    assert seen == ["PASSIVE"]


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
