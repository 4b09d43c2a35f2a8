"""Shared fixtures: a tiny random Llama chat model built in-process, and component contexts.

Nothing is downloaded. The model folder is a normal Hugging Face folder (safetensors,
tokenizer.json with a chat template), so the code under test loads it exactly as it
loads a real model.
"""

from __future__ import annotations

import string
import types
from pathlib import Path

import pytest

import os

# Two pytest-xdist workers share the two cores and most tests' models are not governed
# (loop/threads.py): their idle OpenMP threads sleep rather than spin. Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

torch.set_num_threads(2)

SPECIALS = ["<pad>", "<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def pytest_report_header(config):
    import peft
    import transformers

    line = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    try:
        import vllm  # noqa: F401

        line += f", vllm {vllm.__version__}"
    except Exception:
        line += ", vllm not installed"
    return line


def build_tokenizer():
    """A character-level tokenizer (small alphabet, so <eos> is sampled now and then)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    alphabet = string.ascii_letters + string.digits + " .,:;!?'\"-()\n"
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(folder: Path, seed: int = 0, heads: int = 4, kv_heads: int = 2) -> Path:
    """hidden 64: 4 heads give head_dim 16 (the default; vLLM's CPU attention needs 32+)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def build_random_adapter(model_dir, folder: Path, seed: int, r: int = 8, std: float = 0.3) -> str:
    """A LoRA adapter on every linear layer of ``model_dir`` with nonzero A (PEFT's
    ``init_lora_weights=False``) and B (normal, ``std``), so it really changes the policy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    """One shared Policy, as in a run (generator and updater use the same model object)."""
    from loop.policy import Policy

    return Policy(tiny_model_dir, device="cpu", dtype="float32")


def make_context(
    policy=None,
    *,
    generator=None,
    adapter=None,
    seed=0,
    round=1,
    phase="generate",
    run_dir=None,
    progress=None,
    source_dir=None,
):
    """A ``loop.context.Context`` for a component test (no store, no runner)."""
    from loop.context import Context

    return Context(
        config=types.SimpleNamespace(seed=seed, source_dir=source_dir),
        run_dir=Path(run_dir or "."),
        round=round,
        phase=phase,
        adapter=adapter,
        policy_label="base" if adapter is None else f"round-{round - 1}",
        store=None,
        generator=generator,
        _policy_factory=(lambda: policy) if policy is not None else None,
        _progress=progress,
    )


@pytest.fixture
def make_ctx(tiny_policy):
    """``make_ctx(**kw)`` -> a Context whose ``policy()`` is the shared tiny policy."""

    def make(**kw):
        return make_context(kw.pop("policy", tiny_policy), **kw)

    return make


@pytest.fixture(scope="session")
def world_runs_dir(tmp_path_factory) -> Path:
    """One runs folder for every CLI run of the session: the tiny world's model is built
    once, into its ``.cache``. ``SELFLOOP_TEST_SEED_CACHE=DIR`` copies the built models of
    ``DIR`` (a runs folder's ``.cache``) in first, to skip the build on a busy machine."""
    import os
    import shutil

    runs = tmp_path_factory.mktemp("world-runs")
    seed = os.environ.get("SELFLOOP_TEST_SEED_CACHE")
    if seed:
        shutil.copytree(seed, runs / ".cache")
    return runs


# The demo, shortened (a 250-step seed recipe, 24 prompts a round, 8 optimizer steps, 40
# held-out prompts), two rounds through the real CLI: tests/test_demo.py checks what it
# stores and that it learns; tests/test_prompt_demos.py runs the same with OPRO and BPO;
# tests/test_report.py renders its HTML report.
DEMO_SHORT = [
    "--set", "model.build.steps=250",
    "--set", "prompts.0.per_round=24",
    "--set", "evaluators.0.heldout=40",
    "--set", "updater.max_steps=8",   # 4 steps gain +17.5 by round 2, 8 steps +22.5
    "--set", "updater.batch_size=8",
]


@pytest.fixture(scope="session")
def demo_run(world_runs_dir):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "loop", "demo", "--rounds", "2", "--progress", "plain",
           "--set", f"runs_dir={world_runs_dir}", *DEMO_SHORT]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return world_runs_dir / "demo", proc
