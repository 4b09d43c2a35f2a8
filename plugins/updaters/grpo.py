"""GRPO, RLOO and Dr. GRPO on LoRA adapters: group-relative policy gradients.

Config::

    [selector]
    name = "ranked"            # every scored candidate of a prompt: one group

    [updater]
    name = "grpo"
    advantage = "grpo"         # or "dr_grpo", "rloo" (plugins/updaters/losses.py)
    clip_eps = 0.2
    clip_eps_high = 0.28       # DAPO's clip-higher (None: clip_eps)
    beta = 0.0                 # k3 KL to the reference; 0 skips the reference pass
    aggregation = "token_mean" # or "sequence_mean", "dr_grpo"
    epochs = 1
    mini_batch = 16            # candidates per optimizer step

A round (generate n per prompt, judge, select) is one GRPO iteration: the judges'
combined score of each candidate is its reward (Shao et al., 2024, DeepSeekMath,
Algorithm 1, with the round's candidates as the sampled outputs).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

import loop
from plugins.updaters.losses import ADVANTAGES, clipped_surrogate, k3_kl, sequence_terms
from plugins.updaters.rl import (
    RLOptions,
    encode_rows,
    padded,
    policy_tokens,
    reference_adapter,
    scored_groups,
    token_normaliser,
    token_pass,
)
from plugins.updaters.training import LoRAUpdater, summary, train


def group_advantages(groups: list[list[loop.Selected]], kind: str) -> list[float]:
    """Each candidate's advantage from its group's rewards (``ADVANTAGES[kind]``), flat."""
    out: list[float] = []
    for g in groups:
        rewards = torch.tensor([float(s.score) for s in g], dtype=torch.float64)
        out += ADVANTAGES[kind](rewards).tolist()
    return out


class GRPOUpdater(LoRAUpdater):
    """Train the next LoRA adapter with the group-relative clipped surrogate.

    The algorithm (``update``):

    1. Groups: each prompt's scored candidates (``ranked`` selector); rewards are the
       combined judge scores; advantages per group (``advantage``), one per candidate.
    2. Old-policy per-token log-probs under the policy that generated the candidates
       (``ctx.adapter``), once, without gradients, stored in the run folder; with
       ``beta > 0`` the reference's too (the base model, or the previous policy, whose
       log-probs are the old ones).
    3. ``epochs`` passes over the candidates in ``mini_batch``-sized optimizer steps
       (seeded order, length-grouped, packed forward passes): per token the clipped
       surrogate (``clip_eps``, ``clip_eps_high``) plus ``beta`` x k3 KL, aggregated by
       ``aggregation`` over the step (``training.train``).
    4. Save the adapter.

    Logged metrics per step: ``grpo/clip_frac`` (share of tokens whose clipped term was
    taken), ``grpo/kl`` (mean k3 KL to the reference per token; 0 with ``beta = 0``),
    ``grpo/ratio`` (mean probability ratio to the old policy), ``grpo/advantage_abs``.
    Round: ``grpo/groups``, ``grpo/reward_mean``, ``grpo/reward_std`` (within groups).
    """

    name = "grpo"

    class Options(RLOptions):
        # How a candidate's reward becomes its advantage within its prompt's group.
        advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
        # Weight of the k3 KL penalty to the reference (0: no reference pass at all).
        beta: float = Field(0.0, ge=0.0)
        # How token losses become the step's loss (see losses.sequence_terms).
        aggregation: Literal["token_mean", "sequence_mean", "dr_grpo"] = "token_mean"
        # dr_grpo aggregation's constant length (None: generate.max_new_tokens + 1 for EOS).
        max_tokens: int | None = Field(None, ge=1)

        @model_validator(mode="after")
        def _one_step_size(self):
            if self.grad_accum != 1:
                raise ValueError("set mini_batch (candidates per step) instead of grad_accum")
            return self

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        opts = self.options
        groups = scored_groups(self.name, selection)
        rows = [s for g in groups for s in g]
        encoded = encode_rows(ctx, rows, opts.max_length)
        keys = [s.candidate.id for s in rows]
        advantages = torch.tensor(group_advantages(groups, opts.advantage), dtype=torch.float32)
        old = token_pass(self, ctx, keys, encoded, ctx.adapter, "grpo-old")["logps"]
        ref = None
        if opts.beta > 0:
            ref_adapter = reference_adapter(opts, ctx)
            ref = old if ref_adapter == ctx.adapter else token_pass(
                self, ctx, keys, encoded, ref_adapter, "grpo-ref")["logps"]
        max_tokens = opts.max_tokens or _generated_length(ctx)
        policy = ctx.policy()
        pad, device = policy.tokenizer.pad_token_id, policy.device

        def micro(model, mb):
            logps, mask, _ = policy_tokens(model, encoded, mb, pad, device)
            old_lp = padded(old, mb, device)
            adv = advantages[mb].to(device).unsqueeze(1)
            per_token, clipped = clipped_surrogate(
                logps, old_lp, adv, clip_eps=opts.clip_eps, clip_eps_high=opts.clip_eps_high)
            kl = torch.zeros_like(per_token)
            if ref is not None:
                kl = k3_kl(logps, padded(ref, mb, device))
                per_token = per_token + opts.beta * kl
            terms = sequence_terms(per_token, mask, opts.aggregation, max_tokens=max_tokens)
            tokens = mask.sum(-1).clamp(min=1.0)
            with torch.no_grad():
                sums = {
                    "grpo/clip_frac": ((clipped.float() * mask).sum(-1) / tokens).sum().item(),
                    "grpo/kl": ((kl * mask).sum(-1) / tokens).sum().item(),
                    "grpo/ratio": ((torch.exp(logps - old_lp) * mask).sum(-1) / tokens).sum().item(),
                    "grpo/advantage_abs": adv.abs().sum().item(),
                }
            return terms, sums

        norm = token_normaliser(encoded) if opts.aggregation == "token_mean" else None
        lengths = [len(p) + len(r) for p, r in encoded]
        steps = train(self, ctx, len(encoded), micro, lengths=lengths, normaliser=norm,
                      plan_options=opts.plan_options())
        policy.save_adapter(output_dir)
        metrics = summary(steps, len(rows), "candidates")
        metrics["grpo/groups"] = float(len(groups))
        scores = [[float(s.score) for s in g] for g in groups]
        metrics["grpo/reward_mean"] = sum(sum(g) for g in scores) / len(rows)
        metrics["grpo/reward_std"] = sum(torch.tensor(g).std().item() for g in scores) / len(groups)
        return loop.UpdateResult(steps=steps, metrics=metrics)


def _generated_length(ctx) -> int:
    generate = getattr(getattr(ctx, "config", None), "generate", None)
    return int(getattr(generate, "max_new_tokens", 64)) + 1


@loop.hookimpl
def register_updaters(register):
    register(GRPOUpdater)
