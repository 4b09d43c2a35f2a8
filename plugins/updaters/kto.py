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
    LoRAUpdater,
    ReferenceOptions,
    encode,
    forward_logps,
    reference_adapter,
    reference_logps,
    require_selected,
    summary,
    train,
)


def kl_partners(prompts: list) -> list[int] | None:
    """For each example, the index of an example with a *different* prompt, whose answer
    makes its mismatched (prompt, answer) sequence for KTO's reference point z0.

    Examples are grouped by prompt in first-seen order; the j-th example of group g is
    paired with the (j mod size)-th example of group g+1 (the last group wraps to the
    first): a shift over prompts, so no KL pair shares its prompt (the labels selector
    emits each prompt's desirable and undesirable answers side by side, which made a shift
    over examples pair half of them with their own prompt). None when there is one prompt.
    """
    groups: dict = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    order = list(groups.values())
    if len(order) < 2:
        return None
    out = [0] * len(prompts)
    for g, members in enumerate(order):
        nxt = order[(g + 1) % len(order)]
        for j, i in enumerate(members):
            out[i] = nxt[j % len(nxt)]
    return out


class KTOUpdater(LoRAUpdater):
    """Train the next LoRA adapter with KTO on labelled answers.

    1. Tokenize each labelled answer (prompt tokens masked) and, for the KL reference
       point, a mismatched one: this prompt with an answer to *another* prompt
       (``kl_partners``: a shift over prompts, the paper's estimate of ``z0`` from
       unrelated outputs, sec. 4.1, as TRL does). With a single prompt there is no
       mismatched answer: z0 = 0 for the round, and an event says so.
    2. Reference log-probs of both under the reference policy (``reference``: the
       previous round's, or the base model), once per round, stored in the run folder
       (``reference_logps``).
    3. Per step, one forward pass over matched and mismatched sequences; ``z0`` is the
       micro-batch's mean mismatched log-ratio, clamped at 0 and detached; the loss per
       example from ``losses.kto``; the shared loop (``training.train``) does the rest.
    4. Save the adapter.

    Metrics per step: ``rewards/desirable``, ``rewards/undesirable`` (β × log-ratio,
    summed over examples of that label and divided by the step's size), ``kto/kl``.
    """

    name = "kto"

    class Options(ReferenceOptions):
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
        partners = kl_partners([s.candidate.prompt.text for s in rows]) if opts.kl_estimate else None
        estimate = partners is not None
        if opts.kl_estimate and not estimate:
            ctx.event("kto: every example has the same prompt, so no mismatched answer for "
                      "the KL estimate; z0 = 0 this round", level="warning")
        units = []
        for i, s in enumerate(rows):
            matched = encode(tok, s.candidate.prompt, s.candidate.text, ctx.system, opts.max_length)
            unit = [matched]
            if estimate:
                other = rows[partners[i]].candidate.text
                unit.append(encode(tok, s.candidate.prompt, other, ctx.system, opts.max_length))
            units.append(unit)
        tag = "kto-kl" if estimate else "kto"
        ref, hit = reference_logps(self, ctx, [s.id for s in rows], units, tag)
        if hit:
            ctx.event("reference log-probs read from the run's cache", examples=n)
        desirable = torch.tensor([s.label == "desirable" for s in rows])

        def micro(model, mb):
            seqs = [units[i][0] for i in mb] + [units[i][1] for i in mb if estimate]
            logps, _ = forward_logps(
                model, [p for p, _ in seqs], [r for _, r in seqs], tok.pad_token_id, policy.device
            )
            k = len(mb)
            ref_mb = ref[mb].to(logps.device)
            kl = torch.zeros((), device=logps.device)
            if estimate:
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
        return loop.UpdateResult(steps=steps, metrics=metrics,
                                 reference=reference_adapter(self, ctx)[1])


@loop.hookimpl
def register_updaters(register):
    register(KTOUpdater)
