"""KTO on LoRA adapters: unpaired desirable / undesirable answers (Ethayarajh et al., 2024).

Config::

    [selector]
    name = "labels"      # desirable / undesirable by score threshold or best / worst

    [updater]
    name = "kto"
    beta = 0.1
    desirable_weight = 1.0
    undesirable_weight = 1.0
"""

from __future__ import annotations

import torch
from pydantic import Field

import loop
from plugins.updaters.losses import kto
from plugins.updaters.training import (
    LoRAOptions,
    LoRAUpdater,
    encode,
    forward_logps,
    reference_logps,
    require_selected,
    summary,
    train,
)


class KTOUpdater(LoRAUpdater):
    """Train the next LoRA adapter with KTO on labelled answers.

    1. Tokenize each labelled answer (prompt tokens masked) and, for the KL reference
       point, a mismatched one: this prompt with the next example's answer (the paper's
       estimate of ``z0`` from unrelated outputs, sec. 4.1).
    2. Reference log-probs of both under the previous policy, once per round, stored in
       the run folder (``reference_logps``).
    3. Per step, one forward pass over matched and mismatched sequences; ``z0`` is the
       micro-batch's mean mismatched log-ratio, clamped at 0 and detached; the loss per
       example from ``losses.kto``; the shared loop (``training.train``) does the rest.
    4. Save the adapter.

    Metrics per step: ``rewards/desirable``, ``rewards/undesirable`` (β × log-ratio,
    summed over examples of that label and divided by the step's size), ``kto/kl``.
    """

    name = "kto"

    class Options(LoRAOptions):
        # KL strength, as DPO's beta.
        beta: float = Field(0.1, gt=0.0)
        # λ_D and λ_U: raise the rarer label's weight so λ_D n_D / (λ_U n_U) is in [1, 4/3].
        desirable_weight: float = Field(1.0, gt=0.0)
        undesirable_weight: float = Field(1.0, gt=0.0, description="λ_U, the weight of undesirable examples")
        # Estimate the reference point z0 from mismatched answers (False: z0 = 0, half the cost).
        kl_estimate: bool = True

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        opts = self.options
        rows = require_selected("kto", selection, {"desirable", "undesirable"}, "labels")
        policy = ctx.policy()
        tok = policy.tokenizer
        n = len(rows)
        units = []
        for i, s in enumerate(rows):
            matched = encode(tok, s.candidate.prompt, s.candidate.text, ctx.system, opts.max_length)
            unit = [matched]
            if opts.kl_estimate:
                other = rows[(i + 1) % n].candidate.text
                unit.append(encode(tok, s.candidate.prompt, other, ctx.system, opts.max_length))
            units.append(unit)
        tag = "kto-kl" if opts.kl_estimate else "kto"
        ref, hit = reference_logps(self, ctx, [s.id for s in rows], units, tag)
        if hit:
            ctx.event("reference log-probs read from the run's cache", examples=n)
        desirable = torch.tensor([s.label == "desirable" for s in rows])

        def micro(model, mb):
            seqs = [units[i][0] for i in mb] + [units[i][1] for i in mb if opts.kl_estimate]
            logps, _ = forward_logps(
                model, [p for p, _ in seqs], [r for _, r in seqs], tok.pad_token_id, policy.device
            )
            k = len(mb)
            ref_mb = ref[mb].to(logps.device)
            kl = torch.zeros((), device=logps.device)
            if opts.kl_estimate:
                kl = (logps[k:] - ref_mb[:, 1]).mean().clamp(min=0).detach()
            good = desirable[mb].to(logps.device)
            losses, rewards = kto(
                logps[:k], ref_mb[:, 0], good, kl, beta=opts.beta,
                desirable_weight=opts.desirable_weight, undesirable_weight=opts.undesirable_weight,
            )
            return losses, {
                "rewards/desirable": rewards[good].sum().item(),
                "rewards/undesirable": rewards[~good].sum().item(),
                "kto/kl": kl.item() * k,
            }

        lengths = [sum(len(p) + len(r) for p, r in u) for u in units]
        steps = train(self, ctx, n, micro, lengths=lengths)
        policy.save_adapter(output_dir)
        metrics = summary(steps, n, "examples")
        metrics["train/ref_cache_hit"] = float(hit)
        return loop.UpdateResult(steps=steps, metrics=metrics)


@loop.hookimpl
def register_updaters(register):
    register(KTOUpdater)
