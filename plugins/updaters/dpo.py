"""DPO on LoRA adapters: the update phase of iterative / self-rewarding DPO.

Config::

    [updater]
    name = "dpo"
    loss = "sigmoid"     # or "ipo", "hinge", "robust" (see plugins/updaters/losses.py)
    beta = 0.1
    learning_rate = 5e-5
    epochs = 1

Each round trains the next adapter from the previous one, against the previous round's
policy as the reference (Yuan et al., 2024, sec. 2.3; Xu et al., 2023, iterative DPO), or
with ``reference = "base"`` against the starting model in every round (Dong et al., 2024,
RLHFlow's iterative DPO). ``rounds.reference`` stores which policy it was.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

import loop
from plugins.sequences import encode_prompt, encode_response, truncate
from plugins.updaters.losses import LOSSES, USES_LABEL_SMOOTHING
from plugins.updaters.training import (
    pair_lengths,
    reward_sums,
    LoRAUpdater,
    ReferenceOptions,
    chat_of,
    forward_logps,
    reference_adapter,
    reference_logps,
    summary,
    train,
)


def encode_pairs(tok, pairs, system, max_length):
    """Per pair: ((prompt, chosen + EOS), (prompt, rejected + EOS)), each truncated."""
    out = []
    for pair in pairs:
        prompt = encode_prompt(tok, chat_of(pair.prompt, system))
        out.append(
            (
                truncate(prompt, encode_response(tok, pair.chosen.text), max_length),
                truncate(prompt, encode_response(tok, pair.rejected.text), max_length),
            )
        )
    return out


def pair_logps(model, examples, pad_id, device):
    """Chosen and rejected of every pair in one packed forward pass (each pair's prompt
    once): summed log-probs [B] and token counts [B] of chosen, then of rejected."""
    flat = [e[0] for e in examples] + [e[1] for e in examples]
    logps, counts = forward_logps(model, [p for p, _ in flat], [r for _, r in flat], pad_id, device)
    n = len(examples)
    return logps[:n], logps[n:], counts[:n], counts[n:]


def require_pairs(name: str, selection: loop.Selection) -> list[loop.Pair]:
    if not selection.pairs:
        raise loop.UserError(
            f"{name} updater: the selection has no preference pairs "
            f"({len(selection.selected)} selected candidates); {name} trains on pairs, so use "
            "a selector that makes them (name = \"pairs\")"
        )
    return list(selection.pairs)


class DPOUpdater(LoRAUpdater):
    """Train the next LoRA adapter on preference pairs with a DPO-family loss.

    The algorithm (``update``):

    1. Tokenize each pair as chat-template(prompt) + response + EOS for chosen and
       rejected; only response tokens (EOS included) count.
    2. Reference log-probs under the reference policy (``reference = "previous"``: the
       previous round's, ``ctx.adapter``, None = the base model; ``"base"``: the base
       model every round), computed once per round without gradients and stored in the run folder
       (``reference_logps``): a resumed update reads them back.
    3. Continue the previous adapter (a fresh LoRA from ``ctx.seed`` when there is none).
    4. For each optimizer step (pairs shuffled per epoch from ``ctx.seed``, grouped by
       length): one packed forward pass over chosen and rejected, the loss from
       ``LOSSES``, gradients accumulated over ``grad_accum`` micro-batches, clipped,
       AdamW with warm-up then linear or cosine decay (``training.train``).
    5. Save the adapter into ``output_dir`` as a standard PEFT folder.

    Logged metrics per step: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``
    (chosen - rejected implicit rewards) and ``rewards/accuracy`` (share of pairs with a
    positive margin), measured in the step's forward passes, before its update.
    """

    name = "dpo"

    class Options(ReferenceOptions):
        # Which preference loss (a key of plugins.updaters.losses.LOSSES).
        loss: str = "sigmoid"
        # KL strength: how far the policy may move from the reference (DPO's beta).
        beta: float = Field(0.1, gt=0.0)
        # Assumed label-flip rate for "sigmoid" (cDPO) and "robust"; 0 = trust the judge.
        label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)

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

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        opts = self.options
        pairs = require_pairs("dpo", selection)
        policy = ctx.policy()
        tok = policy.tokenizer
        device = policy.device
        examples = encode_pairs(tok, pairs, ctx.system, opts.max_length)
        ref, hit = reference_logps(self, ctx, [p.id for p in pairs], examples, "pairs")
        if hit:
            ctx.event("reference log-probs read from the run's cache", pairs=len(pairs))
        loss_fn = LOSSES[opts.loss]
        kwargs = {"beta": opts.beta}
        if opts.loss in USES_LABEL_SMOOTHING:
            kwargs["label_smoothing"] = opts.label_smoothing

        def micro(model, mb):
            chunk = [examples[i] for i in mb]
            pol_c, pol_r, n_c, n_r = pair_logps(model, chunk, tok.pad_token_id, device)
            ref_c, ref_r = ref[mb, 0].to(pol_c.device), ref[mb, 1].to(pol_c.device)
            losses, chosen, rejected = loss_fn(
                pol_c, pol_r, ref_c, ref_r, chosen_tokens=n_c, rejected_tokens=n_r, **kwargs
            )
            return losses, reward_sums(chosen, rejected)

        steps = train(self, ctx, len(examples), micro, lengths=pair_lengths(examples))
        policy.save_adapter(output_dir)
        metrics = summary(steps, len(pairs), "pairs")
        metrics["train/ref_cache_hit"] = float(hit)
        return loop.UpdateResult(steps=steps, metrics=metrics,
                                 reference=reference_adapter(self, ctx)[1])


@loop.hookimpl
def register_updaters(register):
    register(DPOUpdater)
