"""Build the tinyworld seed model: a tiny Llama that answers the task and judges answers.

This is the seed of Self-Rewarding Language Models (Yuan et al. 2024, section 2.1), in
miniature. The model is trained from scratch on two kinds of chat data, with the loss on
the assistant's tokens only:

1. IFT (instruction following): ``Sort the letters: d b a`` -> an answer. The answers are
   deliberately imperfect: in a ``habit_rate`` share of examples they start with a chatty
   ``Answer:`` (``Answer: a b d``), which the task does not allow, so greedy decoding mostly
   shows the habit while the right answer keeps a large sampling probability.
   Self-rewarding rounds have to find and fix it.
2. EFT (evaluation fine-tuning): the judge prompt (``prompts/tinyworld_judge.j2``) rendered
   with a prompt and a candidate answer -> a one-line check list and ``Score: N``, where N
   is the rubric score (0..5) of the candidate against the truth (``task.judgment_text``).

The result is a normal Hugging Face model folder (config.json, model.safetensors, tokenizer
files with the chat template), cached under ``<cache_dir>/tinyworld-<recipe hash>/`` and
written atomically. The same recipe gives the same weights (fixed seed and data order).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from pydantic import Field, model_validator

from loop.components import ModelBuilder
from plugins.tinyworld import task

FORMAT_VERSION = 4  # bump when the data or the training code changes what a recipe builds


class Recipe(ModelBuilder.Options):
    """How to build the seed model (the builder's options). Every field enters the cache key.

    The defaults are the demo's model, tuned with ``python -m plugins.tinyworld.experiment``:
    about 0.7M parameters, built in about a minute on two idle CPU cores.
    """

    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds weights, data and data order")
    hidden_size: int = Field(128, ge=16, description="model width")
    layers: int = Field(4, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (must divide hidden_size)")
    intermediate_size: int = Field(256, ge=16, description="MLP width")
    steps: int = Field(600, ge=1, description="optimizer steps of seed training")
    batch_size: int = Field(32, ge=1, description="examples per step")
    lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate (cosine decay)")
    habit_rate: float = Field(
        0.6, ge=0, le=1, description="share of IFT answers showing the bad habit"
    )
    judge_share: float = Field(
        0.6, ge=0, le=1, description="share of steps on EFT (judge) data"
    )
    eft_correct: float = Field(0.3, ge=0, le=1, description="EFT candidates that are right")
    eft_habit: float = Field(0.3, ge=0, le=1, description="EFT candidates with the habit")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of heads ({self.heads})"
            )
        if self.eft_correct + self.eft_habit > 1:
            raise ValueError("eft_correct + eft_habit must be at most 1 (the rest is corrupted)")
        return self

    def key(self) -> str:
        """A short hash of the recipe, the builder's format version and the judge template.

        The template is part of the seed data (and of the tokenizer's vocabulary), so
        editing it makes a new model instead of reusing one trained on the old text.
        """
        from plugins.tinyworld.tokenizer import JUDGE_TEMPLATE

        template = JUDGE_TEMPLATE.read_bytes() if JUDGE_TEMPLATE.is_file() else b""
        blob = json.dumps(
            {"v": FORMAT_VERSION, "template": hashlib.sha256(template).hexdigest(),
             **self.model_dump()},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# A recipe small enough for unit tests (a few seconds); it does not learn the task well.
TEST_RECIPE = Recipe(hidden_size=32, layers=2, heads=2, intermediate_size=64, steps=30,
                     batch_size=8)


# -- seed data ---------------------------------------------------------------------------


def judge_prompt(prompt_text: str, response: str) -> str:
    """The judge template rendered for one candidate (as the loop's judge renders it)."""
    from loop.templates import load_template

    template = load_template("tinyworld_judge", {"prompt", "response"})
    return template.render(prompt=prompt_text, response=response)


def ift_example(rng: random.Random, recipe: Recipe) -> tuple[str, str]:
    """(user message, assistant answer): a train prompt and a deliberately imperfect answer."""
    text, info = task.make_prompt(rng, "train")
    answer = task.habit_answer(info) if rng.random() < recipe.habit_rate else info.answer
    return text, answer


def eft_example(rng: random.Random, recipe: Recipe) -> tuple[str, str]:
    """(user message, assistant judgment): a rendered judge prompt and its rubric judgment."""
    text, info = task.make_prompt(rng, "train")
    u = rng.random()
    if u < recipe.eft_correct:
        response = info.answer
    elif u < recipe.eft_correct + recipe.eft_habit:
        response = task.habit_answer(info)
    else:
        response = task.corrupt_answer(rng, info)
    return judge_prompt(text, response), task.judgment_text(text, response)


def encode_chat(tokenizer, user: str, assistant: str) -> tuple[list[int], list[int]]:
    """Token ids of one exchange and its labels (-100 everywhere but the assistant's turn).

    The prompt part is exactly what the loop feeds the model
    (``apply_chat_template(..., add_generation_prompt=True)``); the answer part is the
    answer's tokens and eos, which is what the loop's generator samples.
    """
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(assistant, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def collate(tokenizer, pairs: list[tuple[list[int], list[int]]]):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    import torch

    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- model -------------------------------------------------------------------------------


def make_model(recipe: Recipe, tokenizer):
    """A freshly initialised ``LlamaForCausalLM`` sized by the recipe."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def train_seed(recipe: Recipe, log=None, report=None):
    """Train the seed model on IFT + EFT data; return (model, tokenizer).

    ``log(text)`` gets a line every 100 steps; ``report(step, steps, loss=...)`` every
    step (the dashboard's "model" row).

    1. Build the tokenizer and a fresh tiny Llama (``torch.manual_seed(recipe.seed)``).
    2. Each step draws a batch of IFT or EFT examples (``judge_share`` of steps are EFT),
       from one ``random.Random(recipe.seed)``, so the data order is fixed.
    3. Minimise cross-entropy on the assistant tokens with AdamW, linear warm-up and
       cosine decay.
    """
    import torch

    from plugins.tinyworld.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = make_model(recipe, tokenizer)
    model.train()
    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98),
                            weight_decay=0.01)
    warmup = max(1, recipe.steps // 20)
    started = time.time()
    for step in range(recipe.steps):
        if step < warmup:
            lr = recipe.lr * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, recipe.steps - warmup)
            lr = recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        make = eft_example if rng.random() < recipe.judge_share else ift_example
        batch = collate(
            tokenizer,
            [encode_chat(tokenizer, *make(rng, recipe)) for _ in range(recipe.batch_size)],
        )
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if report is not None:
            report(step + 1, recipe.steps, loss=loss.item())
        if log is not None and (step % 100 == 0 or step == recipe.steps - 1):
            log(f"seed step {step:5d}  loss {loss.item():.4f}  {time.time() - started:.0f}s")
    model.eval()
    return model, tokenizer


# -- the cached folder -------------------------------------------------------------------


def model_dir(cache_dir: str | os.PathLike, recipe: Recipe) -> Path:
    return Path(cache_dir) / f"tinyworld-{recipe.key()}"


def build(cache_dir: str | os.PathLike, recipe: Recipe | None = None, log=None,
          progress=None) -> str:
    """Return the folder of the seed model for ``recipe``, training it if not cached.

    The folder is written into a temporary sibling and renamed into place, so a killed
    build leaves no half-written model, and a folder that exists is complete.
    """
    recipe = recipe or Recipe()
    final = model_dir(cache_dir, recipe)
    if (final / "config.json").is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = train_seed(recipe, log=log, report=progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tinyworld_recipe.json").write_text(
            json.dumps({"format_version": FORMAT_VERSION, **recipe.model_dump()}, indent=2)
        )
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same build first: keep theirs
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
