"""The judge's old per-row label path, as generators for bench/judge.py (``--plugin``).

``hf_per_row`` and ``vllm_per_row`` are the hf and vllm generators with
``label_logprobs`` put back to ``loop.Generator``'s default: one ``logprobs`` row per
(chat, label), rows packed into ``ROW_TOKENS``-token rows on hf, one prompt-logprobs
engine call per row on vLLM. That is how the RL-CAI judge scored labels before
``label_logprobs`` existed.

It also writes the CPU seconds of each judge phase (this process, every thread: the
in-process vLLM engine too) to the file named by ``BENCH_JUDGE_CPU``, when set.
"""

from __future__ import annotations

import os
import time

import loop
from plugins.generators.hf import HFGenerator
from plugins.generators.vllm import VLLMGenerator


class HFPerRow(HFGenerator):
    name = "hf_per_row"
    label_logprobs = loop.Generator.label_logprobs
    shared_prefix = False  # generation as before too: plain left-padded batches


class VLLMPerRow(VLLMGenerator):
    name = "vllm_per_row"
    label_logprobs = loop.Generator.label_logprobs


@loop.hookimpl
def register_generators(register):
    register(HFPerRow)
    register(VLLMPerRow)


_started: dict[tuple[int, str], float] = {}


@loop.hookimpl
def phase_start(round, phase):
    _started[(round, phase)] = time.process_time()


@loop.hookimpl
def phase_end(round, phase, status):
    out = os.environ.get("BENCH_JUDGE_CPU")
    if out and phase == "judge" and (round, phase) in _started:
        with open(out, "a") as f:
            f.write(f"{round} {time.process_time() - _started[(round, phase)]:.3f}\n")
