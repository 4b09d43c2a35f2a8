"""ORPO on LoRA adapters: preference pairs, no reference model (Hong et al., 2024).

Config::

    [selector]
    name = "pairs"

    [updater]
    name = "orpo"
    lam = 0.1            # weight of the odds-ratio term next to the chosen NLL
"""

from __future__ import annotations

from pydantic import Field

import loop
from plugins.updaters.dpo import encode_pairs, pair_logps, require_pairs
from plugins.updaters.losses import orpo
from plugins.updaters.training import (
    LoRAOptions,
    LoRAUpdater,
    pair_lengths,
    reward_sums,
    summary,
    train,
)


class ORPOUpdater(LoRAUpdater):
    """Train the next LoRA adapter with ORPO: the chosen answer's NLL plus λ times the
    odds-ratio loss of chosen over rejected (``losses.orpo``).

    1. Tokenize each pair (chosen and rejected, prompt tokens masked).
    2. No reference pass: ORPO needs none.
    3. Per step, one forward pass over chosen and rejected concatenated; the loss per
       pair from ``losses.orpo``; the shared loop (``training.train``) does the rest.
    4. Save the adapter.

    Metrics per step: ``rewards/chosen``, ``rewards/rejected`` (λ × mean token log-prob),
    ``rewards/margin``, ``rewards/accuracy``.
    """

    name = "orpo"

    class Options(LoRAOptions):
        # λ of the paper: weight of the odds-ratio term (0.1 in its experiments).
        lam: float = Field(0.1, gt=0.0)

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        opts = self.options
        pairs = require_pairs("orpo", selection)
        policy = ctx.policy()
        tok = policy.tokenizer
        examples = encode_pairs(tok, pairs, ctx.system, opts.max_length)

        def micro(model, mb):
            chunk = [examples[i] for i in mb]
            pc, pr, nc, nr = pair_logps(model, chunk, tok.pad_token_id, policy.device)
            losses, chosen, rejected = orpo(pc, pr, nc, nr, lam=opts.lam)
            return losses, reward_sums(chosen, rejected)

        steps = train(self, ctx, len(examples), micro, lengths=pair_lengths(examples))
        policy.save_adapter(output_dir)
        return loop.UpdateResult(steps=steps, metrics=summary(steps, len(pairs), "pairs"))


@loop.hookimpl
def register_updaters(register):
    register(ORPOUpdater)
