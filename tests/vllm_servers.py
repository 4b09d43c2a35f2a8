"""A real vLLM OpenAI-compatible server for the tests, started as a user would start it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def openai_server(args: list[str], env: dict, log_path: Path, *, startup_s: float = 900):
    """``python -m vllm.entrypoints.openai.api_server ARGS`` on a free loopback port,
    output in ``log_path``; yields its base url (no ``/v1``) once ``/health`` answers,
    stops it afterwards. A server that exits or is not healthy in ``startup_s`` (a
    start-up limit, not an assertion on speed) fails the test with its log's tail."""
    from plugins.generators.vllm_launch import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args,
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read()[-4000:]}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"vLLM server not healthy after {startup_s:.0f} s:\n{log.read()[-4000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
