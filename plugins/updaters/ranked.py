"""RRHF and PRO on LoRA adapters: learn from a ranked list of answers per prompt.

Config::

    [selector]
    name = "ranked"      # every scored candidate, rank 0 = best, group = prompt

    [updater]
    name = "rrhf"        # or "pro"
    sft_weight = 1.0
"""

from __future__ import annotations

from collections import defaultdict

import torch
from pydantic import Field

import loop
from plugins.updaters.losses import LIST_LOSSES
from plugins.updaters.training import (
    LoRAOptions,
    LoRAUpdater,
    encode,
    forward_logps,
    require_selected,
    summary,
    train,
)


def ranked_groups(rows: list[loop.Selected]) -> list[list[loop.Selected]]:
    """Selected rows by group (prompt), best first (rank, then id); groups of two or more."""
    groups: dict[object, list[loop.Selected]] = defaultdict(list)
    for s in rows:
        groups[s.group if s.group is not None else id(s.candidate.prompt)].append(s)
    ordered = [sorted(g, key=lambda s: (s.rank, s.id or 0)) for g in groups.values()]
    return [g for g in ordered if len(g) >= 2]


class RankedUpdater(LoRAUpdater):
    """Train the next LoRA adapter on ranked lists with a listwise loss.

    1. Group the ``ranked`` selector's rows by prompt, best first; tokenize each answer
       (prompt tokens masked). A group's scores order it (equal scores tie); rows
       without a score use their rank.
    2. Per step, one forward pass over every answer of the micro-batch's groups; the
       loss per group from ``LIST_LOSSES[name]`` (ranking term + SFT on the best); the
       shared loop (``training.train``) does the rest.
    3. Save the adapter.

    Metrics per step: ``rank/margin`` (length-normalised log-prob of the best answer
    minus the mean of the others) and ``rank/accuracy`` (share of groups whose best
    answer has the highest length-normalised log-prob).
    """

    class Options(LoRAOptions):
        # Weight of the SFT term on the best answer (1 in both papers' main objective).
        sft_weight: float = Field(1.0, ge=0.0)
        # Groups (prompts) per forward pass; each holds all its ranked answers.
        batch_size: int = Field(2, ge=1)

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        opts = self.options
        groups = ranked_groups(require_selected(self.name, selection, {"ranked"}, "ranked"))
        if not groups:
            raise loop.UserError(
                f"{self.name} updater: no prompt has two or more ranked answers; "
                "generate more samples per prompt (generate.n >= 2)"
            )
        policy = ctx.policy()
        tok = policy.tokenizer
        encoded = [
            [encode(tok, s.candidate.prompt, s.candidate.text, ctx.system, opts.max_length)
             for s in g]
            for g in groups
        ]
        scores = [
            torch.tensor([float(s.score) for s in g])
            if all(s.score is not None for s in g)
            else torch.tensor([float(-s.rank) for s in g])
            for g in groups
        ]
        loss_fn = LIST_LOSSES[self.name]

        def micro(model, mb):
            flat = [seq for i in mb for seq in encoded[i]]
            logps, tokens = forward_logps(
                model, [p for p, _ in flat], [r for _, r in flat], tok.pad_token_id, policy.device
            )
            losses, margin, accuracy, start = [], 0.0, 0.0, 0
            for i in mb:
                n = len(encoded[i])
                lp, nt = logps[start : start + n], tokens[start : start + n]
                start += n
                losses.append(loss_fn(lp, nt, scores[i].to(lp.device), sft_weight=opts.sft_weight))
                p = (lp / nt).detach()
                margin += (p[0] - p[1:].mean()).item()
                accuracy += float(p[0] >= p.max())
            return torch.stack(losses), {"rank/margin": margin, "rank/accuracy": accuracy}

        lengths = [sum(len(p) + len(r) for p, r in g) for g in encoded]
        steps = train(self, ctx, len(encoded), micro, lengths=lengths)
        policy.save_adapter(output_dir)
        return loop.UpdateResult(steps=steps, metrics=summary(steps, len(groups), "groups"))


class RRHFUpdater(RankedUpdater):
    """RRHF (Yuan et al., 2023): pairwise hinge ranking on length-normalised log-probs
    plus SFT on the best answer (``losses.rrhf``)."""

    name = "rrhf"


class PROUpdater(RankedUpdater):
    """PRO (Song et al., 2024): Plackett-Luce listwise loss plus SFT on the best answer
    (``losses.pro``)."""

    name = "pro"


@loop.hookimpl
def register_updaters(register):
    register(RRHFUpdater)
    register(PROUpdater)
