"""RAFT on LoRA adapters: fine-tune on the best-scored samples (Dong et al., 2023).

Config::

    [selector]
    name = "top_k"       # k = 1: best of each prompt; or fraction = 0.25 overall

    [updater]
    name = "raft"
"""

from __future__ import annotations

import loop
from plugins.updaters.losses import sft
from plugins.updaters.training import (
    LoRAOptions,
    LoRAUpdater,
    encode,
    forward_logps,
    require_selected,
    summary,
    train,
)


class RAFTUpdater(LoRAUpdater):
    """Reward-ranked fine-tuning: supervised training on the candidates the ``top_k``
    selector kept (label "top").

    1. Tokenize each kept candidate as chat-template(prompt) + response + EOS; prompt
       tokens are masked, so only the response is learned.
    2. Per step, one forward pass over the micro-batch; the loss per example is its mean
       token NLL (``losses.sft``); the shared loop (``training.train``) does the rest.
    3. Save the adapter.

    Metrics per step: ``train/nll`` (mean token NLL, the loss itself) and
    ``train/tokens`` (response tokens per example).
    """

    name = "raft"

    class Options(LoRAOptions):
        pass

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        opts = self.options
        rows = require_selected("raft", selection, {"top"}, "top_k")
        tok = ctx.policy().tokenizer
        examples = [
            encode(tok, s.candidate.prompt, s.candidate.text, ctx.system, opts.max_length)
            for s in rows
        ]
        steps = supervised(self, ctx, examples)
        ctx.policy().save_adapter(output_dir)
        return loop.UpdateResult(steps=steps, metrics=summary(steps, len(rows), "examples"))


def supervised(updater: LoRAUpdater, ctx, examples: list[tuple[list[int], list[int]]]):
    """Supervised training on encoded (prompt, response) examples: each example's loss
    is its mean response-token NLL (``losses.sft``); the shared loop does the rest.
    RAFT's update and ``plugins.updaters.sft.train_sft`` (BPO's rewriter) both use it."""
    policy = ctx.policy()
    pad_id = policy.tokenizer.pad_token_id

    def micro(model, mb):
        chunk = [examples[i] for i in mb]
        logps, tokens = forward_logps(
            model, [p for p, _ in chunk], [r for _, r in chunk], pad_id, policy.device
        )
        losses = sft(logps, tokens)
        return losses, {
            "train/nll": losses.detach().sum().item(),
            "train/tokens": tokens.sum().item(),
        }

    lengths = [len(p) + len(r) for p, r in examples]
    return train(updater, ctx, len(examples), micro, lengths=lengths)


@loop.hookimpl
def register_updaters(register):
    register(RAFTUpdater)
