"""PPO on LoRA adapters with a value head: the RLHF baseline of InstructGPT.

Config::

    [selector]
    name = "ranked"          # the round's scored candidates (the same data as grpo)

    [updater]
    name = "ppo"
    kl_coef = 0.05           # InstructGPT's per-token KL penalty to the reference
    gamma = 1.0
    lam = 0.95
    clip_eps = 0.2
    value_clip = 0.2
    vf_coef = 0.5
    ema_decay = 0.0          # > 0: the saved policy is an EMA of the trained one

A judge's (or ``trained_rm``'s) sequence score is the reward at the last token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, model_validator

import loop
from plugins.updaters.losses import (
    clipped_surrogate,
    clipped_value_loss,
    ema_update,
    gae,
    sequence_terms,
    shaped_rewards,
    whiten,
)
from plugins.updaters.rl import (
    RLOptions,
    encode_rows,
    load_head,
    padded,
    policy_tokens,
    reference_adapter,
    save_head,
    scored_groups,
    token_normaliser,
    token_pass,
)
from plugins.updaters.training import LoRAUpdater, summary, train

VALUE_HEAD = "value_head.safetensors"


class PPOUpdater(LoRAUpdater):
    """Train the next LoRA adapter and its value head with PPO.

    The algorithm (``update``), the data path shared with ``grpo`` (plugins/updaters/rl.py):

    1. The round's scored candidates (rewards: the combined judge scores).
    2. Once, without gradients: the old policy's per-token log-probs and values (the
       previous round's adapter and value head; a fresh head starts at zero), and the
       reference's log-probs (the base model, or the previous policy).
    3. Per-token rewards: ``-kl_coef`` x (old - reference) log-ratio on every token and
       the score on the last (InstructGPT's shaping, ``losses.shaped_rewards``); GAE
       (``gamma``, ``lam``) gives advantages (whitened over the round) and returns.
    4. ``epochs`` passes in ``mini_batch`` steps: the clipped policy surrogate plus
       ``vf_coef`` x the clipped value loss, token-mean over the step; the value head
       is a scalar linear head on the policy's last hidden state (the policy's LoRA is
       its LoRA on the base), trained with it (``training.train``).
    5. Optional EMA of the LoRA weights (DeepSpeed-Chat): the EMA is saved as the policy.
    6. Save the adapter and ``value_head.safetensors`` beside it.

    Metrics per step: ``ppo/value_loss``, ``ppo/policy_loss``, ``ppo/kl`` (mean summed
    log-ratio to the reference per answer), ``ppo/clip_frac``; round: ``ppo/reward_mean``.
    """

    name = "ppo"

    class Options(RLOptions):
        # InstructGPT's β: the per-token KL penalty folded into the rewards.
        kl_coef: float = Field(0.05, ge=0.0)
        # Discount over tokens (1: the score counts fully at every token).
        gamma: float = Field(1.0, ge=0.0, le=1.0)
        # GAE's λ: bias (0) vs variance (1) of the advantage estimate.
        lam: float = Field(0.95, ge=0.0, le=1.0)
        # Clip range of the value prediction around the old value.
        value_clip: float = Field(0.2, gt=0.0)
        # Weight of the value loss beside the policy loss.
        vf_coef: float = Field(0.5, ge=0.0)
        # EMA decay of the saved policy's LoRA weights (0: save the trained weights).
        ema_decay: float = Field(0.0, ge=0.0, lt=1.0)

        @model_validator(mode="after")
        def _not_sharded(self):
            from loop.launch import distributed_type

            file = self.launch.config_file if self.launch is not None else None
            if file and distributed_type(Path(file))[0] == "FSDP":
                raise ValueError(
                    "launch.config_file: ppo's value head runs the decoder and the head "
                    "separately, which FSDP2 sharding does not support yet; use "
                    "configs/accelerate/ddp.yaml")
            return self

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        opts = self.options
        rows = [s for g in scored_groups(self.name, selection) for s in g]
        encoded = encode_rows(ctx, rows, opts.max_length)
        keys = [s.candidate.id for s in rows]
        policy = ctx.policy()
        device, pad = policy.device, policy.tokenizer.pad_token_id
        head = value_head(policy, ctx.adapter)
        start = token_pass(self, ctx, keys, encoded, ctx.adapter, "ppo-old", value_head=head)
        old, old_values = start["logps"], start["values"]
        ref_adapter = reference_adapter(opts, ctx)
        ref = old if ref_adapter == ctx.adapter else token_pass(
            self, ctx, keys, encoded, ref_adapter, "ppo-ref")["logps"]
        everyone = list(range(len(rows)))
        mask = padded([torch.ones(len(r)) for r in old], everyone, "cpu")
        scores = torch.tensor([float(s.score) for s in rows])
        rewards = shaped_rewards(scores, padded(old, everyone, "cpu"), padded(ref, everyone, "cpu"), mask,
                                 kl_coef=opts.kl_coef)
        v_old = padded(old_values, everyone, "cpu")
        adv, returns = gae(rewards, v_old, mask, gamma=opts.gamma, lam=opts.lam)
        adv = whiten(adv, mask)

        def micro(model, mb):
            logps, m, values = policy_tokens(model, encoded, mb, pad, device, value_head=head)
            width = logps.shape[1]
            a, ret = adv[mb, :width].to(device), returns[mb, :width].to(device)
            vo, old_lp = v_old[mb, :width].to(device), padded(old, mb, device)
            pg, clipped = clipped_surrogate(logps, old_lp, a, clip_eps=opts.clip_eps,
                                            clip_eps_high=opts.clip_eps_high)
            vf = clipped_value_loss(values, vo, ret, clip=opts.value_clip)
            pg_terms = sequence_terms(pg, m, "token_mean")
            vf_terms = sequence_terms(vf, m, "token_mean")
            tokens = m.sum(-1).clamp(min=1.0)
            with torch.no_grad():
                sums = {
                    "ppo/value_loss": (vf_terms / tokens).sum().item(),
                    "ppo/policy_loss": (pg_terms / tokens).sum().item(),
                    "ppo/kl": ((logps - padded(ref, mb, device)) * m).sum().item(),
                    "ppo/clip_frac": ((clipped.float() * m).sum(-1) / tokens).sum().item(),
                }
            return pg_terms + opts.vf_coef * vf_terms, sums

        ema: dict[str, torch.Tensor] = {}

        def after_step(model):
            if opts.ema_decay <= 0:
                return
            params = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
            if not ema:
                ema.update({n: p.detach().clone() for n, p in params.items()})
            ema_update(ema, params, decay=opts.ema_decay)

        head.requires_grad_(True)
        steps = train(self, ctx, len(rows), micro, lengths=[len(p) + len(r) for p, r in encoded],
                      normaliser=token_normaliser(encoded), extra_params=list(head.parameters()),
                      after_step=after_step, plan_options=opts.plan_options())
        if ema:
            named = dict(policy.model.named_parameters())
            with torch.no_grad():
                for n, v in ema.items():
                    named[n].copy_(v)
        policy.save_adapter(output_dir)
        save_head(head, Path(output_dir) / VALUE_HEAD)
        metrics = summary(steps, len(rows), "candidates")
        metrics["ppo/reward_mean"] = scores.mean().item()
        return loop.UpdateResult(steps=steps, metrics=metrics)


def value_head(policy, adapter: str | None) -> torch.nn.Linear:
    """The previous round's value head (beside its adapter), or a fresh one at zero."""
    path = Path(adapter) / VALUE_HEAD if adapter else None
    if path is not None and path.is_file():
        return load_head(path, policy.device)
    head = torch.nn.Linear(policy.base.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head.to(policy.device)


@loop.hookimpl
def register_updaters(register):
    register(PPOUpdater)
