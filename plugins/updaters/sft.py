"""Supervised fine-tuning of a fresh LoRA adapter: ``train_sft``, reusable by any component.

The BPO prompt optimiser trains its prompt rewriter with it (plugins/prompts/bpo.py). It is
a function, not an updater: the round's update phase stays with the configured updater.

The algorithm (``train_sft``):

1. Tokenize each example as chat-template(chat) + response + EOS; only response tokens
   (EOS included) count, truncated to ``max_length`` as the DPO updater does.
2. Start a fresh LoRA adapter on the shared policy (seeded), AdamW at a constant rate.
3. Each step takes ``batch_size`` examples (an epoch is a seeded permutation) and
   minimises the mean negative log-likelihood per response token; gradients are clipped.
4. Save the adapter into ``output_dir`` as a standard PEFT folder.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

import loop
from loop.context import derive_seed
from plugins.sequences import (
    encode_prompt,
    encode_response,
    seeded,
    sequence_logprobs,
    training_batch,
    truncate,
)


class SFTOptions(BaseModel):
    """Options of one SFT run (a sub-section of the component that trains)."""

    model_config = ConfigDict(extra="forbid")

    # A LoRA tolerates large steps; the rewriter sees few examples.
    learning_rate: float = Field(5e-4, gt=0.0)
    # Passes over the examples (ignored when max_steps is set).
    epochs: int = Field(1, ge=1)
    # If set, exactly this many optimizer steps (epochs repeat as needed).
    max_steps: int | None = Field(None, ge=1)
    # Examples per step.
    batch_size: int = Field(8, ge=1)
    # Longest prompt+response in tokens.
    max_length: int = Field(512, ge=8)
    # Gradient-norm clip.
    max_grad_norm: float = Field(1.0, gt=0.0)
    # LoRA rank, scale numerator, dropout and target modules of the new adapter.
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


def _plan(count: int, opts: SFTOptions, seed: int) -> list[list[int]]:
    steps, epoch = [], 0
    while True:
        order = list(range(count))
        random.Random(derive_seed(seed, "sft-epoch", epoch)).shuffle(order)
        steps += [order[i : i + opts.batch_size] for i in range(0, count, opts.batch_size)]
        epoch += 1
        if opts.max_steps is not None:
            if len(steps) >= opts.max_steps:
                return steps[: opts.max_steps]
        elif epoch >= opts.epochs:
            return steps


def train_sft(
    policy,
    examples: list[tuple[loop.Chat, str]],
    options: SFTOptions,
    seed: int,
    output_dir: str,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[loop.TrainStep]:
    """Train a fresh LoRA adapter on (chat, response) examples; save it to ``output_dir``."""
    if not examples:
        raise ValueError("train_sft needs at least one example")
    from peft import LoraConfig

    tok = policy.tokenizer
    device = policy.device
    data = [
        truncate(encode_prompt(tok, chat), encode_response(tok, response), options.max_length)
        for chat, response in examples
    ]
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha,
                        lora_dropout=options.lora_dropout, target_modules=options.target_modules,
                        bias="none", task_type="CAUSAL_LM")
    plan = _plan(len(data), options, seed)
    steps: list[loop.TrainStep] = []
    with seeded(seed, device):
        model = policy.trainable(config, init_from=None, seed=seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=options.learning_rate)
        model.train()
        try:
            for number, batch_idx in enumerate(plan, start=1):
                batch = training_batch([data[i][0] for i in batch_idx],
                                       [data[i][1] for i in batch_idx], tok.pad_token_id, device)
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                tokens = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
                loss = -sequence_logprobs(logits, batch["labels"]).sum() / tokens
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
                optimizer.step()
                steps.append(loop.TrainStep(step=number, loss=float(loss.detach()),
                                            learning_rate=options.learning_rate,
                                            grad_norm=float(grad_norm)))
                if progress is not None:
                    progress(number, len(plan), float(loss.detach()))
        finally:
            model.eval()
    policy.save_adapter(output_dir)
    return steps
