"""DPO on LoRA adapters: the update phase of iterative / self-rewarding DPO.

Config::

    [updater]
    name = "dpo"
    loss = "sigmoid"     # or "ipo", "hinge", "robust" (see plugins/updaters/losses.py)
    beta = 0.1
    learning_rate = 5e-5
    epochs = 1

Each round trains the next adapter from the previous one, against the previous round's
policy as the reference (Yuan et al., 2024, sec. 2.3; Xu et al., 2023, iterative DPO).
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

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
from plugins.updaters.losses import LOSSES, USES_LABEL_SMOOTHING


class DPOUpdater(loop.Updater):
    """Train the next LoRA adapter on preference pairs with a DPO-family loss.

    The algorithm (``update``):

    1. Tokenize each pair as chat-template(prompt) + response + EOS for chosen and
       rejected; only response tokens (EOS included) count.
    2. Compute the reference log-probs once, without gradients, under the previous
       policy (``ctx.adapter``; None = the base model).
    3. Continue the previous adapter (a fresh LoRA from ``ctx.seed`` when there is none).
    4. For each optimizer step (pairs shuffled per epoch from ``ctx.seed``): one forward
       pass over chosen and rejected concatenated, the loss from ``LOSSES``, gradients
       accumulated over ``grad_accum`` micro-batches, clipped, AdamW with warm-up then
       linear or cosine decay.
    5. Save the adapter into ``output_dir`` as a standard PEFT folder.

    Logged metrics per step: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``
    (chosen - rejected implicit rewards) and ``rewards/accuracy`` (share of pairs with a
    positive margin), measured in the step's forward passes, before its update.
    """

    name = "dpo"

    class Options(loop.Updater.Options):
        # Which preference loss (a key of plugins.updaters.losses.LOSSES).
        loss: str = "sigmoid"
        # KL strength: how far the policy may move from the reference (DPO's beta).
        beta: float = Field(0.1, gt=0.0)
        # Assumed label-flip rate for "sigmoid" (cDPO) and "robust"; 0 = trust the judge.
        label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
        # LoRA tolerates far larger steps than full fine-tuning (which uses ~5e-7).
        learning_rate: float = Field(5e-5, ge=0.0)
        # Passes over the round's pairs (the Self-Rewarding recipe trains one per round).
        epochs: int = Field(1, ge=1)
        # If set, stop after this many optimizer steps (overrides epochs, cycling the data).
        max_steps: int | None = Field(None, ge=1)
        # Pairs per forward pass (each pass holds 2 x batch_size sequences).
        batch_size: int = Field(4, ge=1)
        # Micro-batches per optimizer step: a larger effective batch at the same memory.
        grad_accum: int = Field(1, ge=1)
        # Share of steps spent warming the learning rate up from near zero.
        warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
        # Decay after warm-up ("constant" keeps the peak rate).
        scheduler: Literal["linear", "cosine", "constant"] = "linear"
        # Gradient-norm clip: keeps one bad batch from wrecking the adapter.
        max_grad_norm: float = Field(1.0, gt=0.0)
        # AdamW decoupled weight decay on the LoRA weights.
        weight_decay: float = Field(0.0, ge=0.0)
        # Longest prompt+response in tokens; longer pairs are truncated (see truncate()).
        max_length: int = Field(1024, ge=8)
        # LoRA rank: capacity of the update (generators size their LoRA slots by it).
        lora_r: int = Field(16, ge=1)
        # LoRA scale numerator (the update is scaled by alpha / r).
        lora_alpha: float = Field(32, gt=0.0)
        # Dropout on the LoRA input during training only.
        lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
        # Modules to adapt: "all-linear" (every linear layer but the output head) or names.
        target_modules: str | list[str] = "all-linear"

        @field_validator("loss")
        @classmethod
        def _known_loss(cls, value: str) -> str:
            if value not in LOSSES:
                raise ValueError(f"unknown loss {value!r}; choose one of {sorted(LOSSES)}")
            return value

        @model_validator(mode="after")
        def _smoothing_applies(self):
            if self.label_smoothing and self.loss not in USES_LABEL_SMOOTHING:
                raise ValueError(
                    f"label_smoothing is only used by {sorted(USES_LABEL_SMOOTHING)}; "
                    f"remove it or set loss to one of those (loss is {self.loss!r})"
                )
            return self

    def lora_rank(self) -> int | None:
        return self.options.lora_r

    def lora_config(self):
        from peft import LoraConfig

        opts = self.options
        return LoraConfig(
            r=opts.lora_r,
            lora_alpha=opts.lora_alpha,
            lora_dropout=opts.lora_dropout,
            target_modules=opts.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        opts = self.options
        pairs = list(selection.pairs)
        if not pairs:
            raise loop.UserError(
                f"dpo updater: the selection has no preference pairs "
                f"({len(selection.selected)} selected candidates); DPO trains on pairs, so use "
                "a selector that makes them (name = \"pairs\")"
            )
        policy = ctx.policy()
        tok = policy.tokenizer
        device = policy.device

        # 1. tokenize: (prompt ids, chosen ids + EOS, rejected ids + EOS), truncated
        examples = []
        for pair in pairs:
            prompt = encode_prompt(tok, _chat(pair.prompt, ctx.system))
            p_c, chosen = truncate(prompt, encode_response(tok, pair.chosen.text), opts.max_length)
            p_r, rejected = truncate(
                prompt, encode_response(tok, pair.rejected.text), opts.max_length
            )
            examples.append((p_c, chosen, p_r, rejected))

        # 2. reference log-probs, once, under the previous policy
        with policy.using(ctx.adapter) as ref_model, torch.no_grad():
            ref_model.eval()
            ref = torch.empty(len(examples), 2)
            for start in range(0, len(examples), opts.batch_size):
                idx = list(range(start, min(start + opts.batch_size, len(examples))))
                c, r = _pair_logps(ref_model, [examples[i] for i in idx], tok.pad_token_id, device)
                ref[idx, 0], ref[idx, 1] = c.float().cpu(), r.float().cpu()

        # 3.-4. train
        plan = _plan(len(examples), opts, ctx.seed)
        total = len(plan)
        steps: list[loop.TrainStep] = []
        with seeded(ctx.seed, device):
            model = policy.trainable(self.lora_config(), init_from=ctx.adapter, seed=ctx.seed)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(
                params, lr=opts.learning_rate, weight_decay=opts.weight_decay
            )
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(opts, total))
            loss_fn = LOSSES[opts.loss]
            model.train()
            try:
                for number, (epoch, micro_batches) in enumerate(plan, start=1):
                    step = self._step(
                        model, micro_batches, examples, ref, loss_fn, params, optimizer, tok, device
                    )
                    step_record = loop.TrainStep(
                        step=number,
                        loss=step["loss"],
                        learning_rate=schedule.get_last_lr()[0],
                        grad_norm=step["grad_norm"],
                        metrics={k: v for k, v in step.items() if k.startswith("rewards/")},
                    )
                    step_record.metrics["train/epoch"] = float(epoch)
                    schedule.step()
                    steps.append(step_record)
                    ctx.progress(number, total, loss=step_record.loss)
            finally:
                model.eval()

        # 5. save
        policy.save_adapter(output_dir)
        return loop.UpdateResult(steps=steps, metrics=_summary(steps, len(pairs)))

    def _step(self, model, micro_batches, examples, ref, loss_fn, params, optimizer, tok, device):
        opts = self.options
        size = sum(len(mb) for mb in micro_batches)
        keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy")
        sums = dict.fromkeys(keys, 0.0)
        optimizer.zero_grad(set_to_none=True)
        for mb in micro_batches:
            pol_c, pol_r = _pair_logps(model, [examples[i] for i in mb], tok.pad_token_id, device)
            ref_c = ref[mb, 0].to(device)
            ref_r = ref[mb, 1].to(device)
            kwargs = {"beta": opts.beta}
            if opts.loss in USES_LABEL_SMOOTHING:
                kwargs["label_smoothing"] = opts.label_smoothing
            losses, chosen_r, rejected_r = loss_fn(
                pol_c.float(), pol_r.float(), ref_c, ref_r, **kwargs
            )
            # weight each micro-batch by its share of the step, so the step's gradient is
            # the mean over all its pairs
            (losses.sum() / size).backward()
            sums["loss"] += losses.detach().sum().item()
            sums["rewards/chosen"] += chosen_r.sum().item()
            sums["rewards/rejected"] += rejected_r.sum().item()
            sums["rewards/accuracy"] += (chosen_r > rejected_r).float().sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        out = {k: v / size for k, v in sums.items()}
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["grad_norm"] = float(grad_norm)
        return out


def _chat(prompt: loop.Prompt, system: str | None) -> loop.Chat:
    """The prompt as the generator saw it (the round's system instruction if it has none)."""
    chat = prompt.chat()
    if system and not prompt.system:
        chat.insert(0, {"role": "system", "content": system})
    return chat


def _pair_logps(model, examples, pad_id, device):
    """Summed response log-probs of chosen and rejected, in one forward pass."""
    prompts = [e[0] for e in examples] + [e[2] for e in examples]
    responses = [e[1] for e in examples] + [e[3] for e in examples]
    batch = training_batch(prompts, responses, pad_id, device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logprobs(logits, batch["labels"])
    return logps[: len(examples)], logps[len(examples) :]


def _plan(count: int, opts, seed: int) -> list[tuple[int, list[list[int]]]]:
    """The optimizer steps: (epoch, micro-batches of pair indices), in a seeded order.

    Each epoch is a fresh permutation; a step never spans two epochs. With ``max_steps``
    epochs repeat until there are that many steps.
    """
    plan: list[tuple[int, list[list[int]]]] = []
    epoch = 0
    while True:
        order = list(range(count))
        random.Random(derive_seed(seed, "dpo-epoch", epoch)).shuffle(order)
        micro = [order[i : i + opts.batch_size] for i in range(0, count, opts.batch_size)]
        for i in range(0, len(micro), opts.grad_accum):
            plan.append((epoch, micro[i : i + opts.grad_accum]))
        epoch += 1
        if opts.max_steps is not None:
            if len(plan) >= opts.max_steps:
                return plan[: opts.max_steps]
        elif epoch >= opts.epochs:
            return plan


def _lr_lambda(opts, total: int):
    """Multiplier of the peak rate at step s (0-based): linear warm-up, then decay.

    Warm-up reaches the peak on its last step ((s + 1) / warmup) so the first step
    already moves; decay ends just above zero on the final step.
    """
    warmup = math.ceil(opts.warmup_ratio * total)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if opts.scheduler == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if opts.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def _summary(steps: list[loop.TrainStep], pairs: int) -> dict[str, float]:
    last_epoch = steps[-1].metrics["train/epoch"]
    last = [s for s in steps if s.metrics["train/epoch"] == last_epoch]
    metrics = {
        "train/loss": sum(s.loss for s in steps) / len(steps),
        "train/final_loss": steps[-1].loss,
        "train/steps": float(len(steps)),
        "train/pairs": float(pairs),
    }
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        metrics[key] = sum(s.metrics[key] for s in last) / len(last)
    return metrics


@loop.hookimpl
def register_updaters(register):
    register(DPOUpdater)
