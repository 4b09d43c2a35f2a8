"""Supervised fine-tuning: the ``sft`` updater (SL-CAI) and ``train_sft``, a fresh LoRA
adapter for any component.

``[updater] name = "sft"`` trains the policy on (prompt, answer) examples of the round's
selection: with ``train_on = "revisions"`` (the default) the final revisions a
constitutional judge wrote, offered as the chosen side of its pairs (the paper's SL-CAI
stage: fine-tune on the revised answers); with ``"chosen"`` every selected pair's chosen
answer. Put it in a ``[[stages]]`` entry before a preference updater to run SL-CAI, then
RL-CAI, in one config (configs/cai_stages.toml).

The BPO prompt optimiser trains its prompt rewriter with ``train_sft`` (plugins/prompts/bpo.py).

The algorithm (``train_sft``):

1. Tokenize each example as chat-template(chat) + response + EOS; only response tokens
   (EOS included) count, truncated to ``max_length`` as the DPO updater does.
2. Train a fresh LoRA adapter on the shared policy (seeded) with RAFT's supervised path
   (``plugins.updaters.raft.supervised``: per-example mean token NLL, the shared training
   loop of every updater), at a constant learning rate without warm-up.
3. Save the adapter into ``output_dir`` as a standard PEFT folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import ConfigDict, Field

import loop
from loop.checked import Checked
from plugins.sequences import encode_prompt, encode_response, truncate
from plugins.updaters.training import LoRAOptions, LoRAUpdater, encode, summary


class SFTUpdater(LoRAUpdater):
    """Supervised training of the next adapter on (prompt, answer) examples.

    1. The examples: the chosen answers of the selection's pairs that are revisions
       (``train_on = "revisions"``: ``candidate.source == "revision"``, the final text of
       a critique-revision chain), or every pair's chosen answer (``"chosen"``), each
       answer once. None: a clear error naming what would give some.
    2. Continue the previous adapter with RAFT's supervised path (per-example mean token
       NLL, the shared training loop) and save it.

    Metrics: ``train/nll``, ``train/tokens`` per step; ``train/examples``.
    """

    name = "sft"

    class Options(LoRAOptions):
        # What to imitate: a constitutional judge's revisions (SL-CAI) or every chosen answer.
        train_on: Literal["revisions", "chosen"] = "revisions"

    def update(self, ctx, selection: loop.Selection, output_dir: str) -> loop.UpdateResult:
        from plugins.updaters.raft import supervised

        opts = self.options
        seen, rows = set(), []
        for p in selection.pairs:
            if opts.train_on == "revisions" and p.chosen.source != "revision":
                continue
            if id(p.chosen) not in seen:
                seen.add(id(p.chosen))
                rows.append(p.chosen)
        if not rows:
            want = ("revisions: add a constitutional judge and keep its offered pairs "
                    "([selector] use_offered = true)" if opts.train_on == "revisions"
                    else "pairs: use a selector that makes them (name = \"pairs\")")
            raise loop.UserError(
                f"sft updater: nothing to train on this round ({len(selection.pairs)} pairs, "
                f"none with a chosen answer to imitate); train_on = {opts.train_on!r} needs {want}")
        tok = ctx.policy().tokenizer
        examples = [encode(tok, c.prompt, c.text, ctx.system, opts.max_length) for c in rows]
        steps = supervised(self, ctx, examples)
        ctx.policy().save_adapter(output_dir)
        return loop.UpdateResult(steps=steps, metrics=summary(steps, len(rows), "examples"))


@loop.hookimpl
def register_updaters(register):
    register(SFTUpdater)


class SFTOptions(Checked):
    """Options of one SFT run (a sub-section of the component that trains)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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


@dataclass
class _Run:
    """What the shared training loop reads of a phase context, for a standalone run."""

    _policy: object
    seed: int
    _progress: Callable[[int, int, float], None] | None
    adapter: str | None = None

    def policy(self):
        return self._policy

    def progress(self, done: int, total: int | None = None, **metrics: float) -> None:
        if self._progress is not None:
            self._progress(done, total, metrics.get("loss", float("nan")))


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
    from plugins.updaters.raft import RAFTUpdater, supervised

    tok = policy.tokenizer
    data = [
        truncate(encode_prompt(tok, chat), encode_response(tok, response), options.max_length)
        for chat, response in examples
    ]
    updater = RAFTUpdater(
        RAFTUpdater.Options(**options.model_dump(), warmup_ratio=0.0, scheduler="constant")
    )
    steps = supervised(updater, _Run(policy, seed, progress), data)
    policy.save_adapter(output_dir)
    return steps
