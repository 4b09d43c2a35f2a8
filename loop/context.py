"""What a component sees of the run: ``ctx``, passed to every component method.

A context is made per phase by the runner. It gives:

- ``ctx.round``, ``ctx.phase``, ``ctx.seed`` (derived from the run seed, the round and
  the phase, so a re-run phase draws the same numbers) and ``ctx.rng()``;
- ``ctx.adapter``: the folder of the policy's adapter in this phase (None: the base
  model), and ``ctx.policy_label`` ("base" or "round-<r>");
- ``ctx.generator``: the run's generator, for judges and optimisers that call the model;
- ``ctx.policy()``: the shared transformers model (base + LoRA slot), for PEFT updaters
  and the transformers generator;
- ``ctx.system``: the round's system instruction, if an optimiser chose one;
- ``ctx.store``: read access to everything stored so far;
- ``ctx.progress(done, total, **metrics)`` and ``ctx.event(message)`` for observers;
- ``ctx.metric(name, value)``: a metric measured inside a component call (the vLLM
  generator's policy-sync check), stored with the phase's results;
- ``ctx.lora_rank``: the LoRA rank the run's updater trains (None: unknown), so a
  generator can size its adapter slots;
- ``ctx.template(name_or_path, required)``: a prompt template from ``prompts/``;
- ``ctx.chat(text)``: a user message as the policy is deployed: after the round's system
  instruction when there is one (evaluators answer as the policy is deployed);
- ``ctx.score(candidates)``: the run's judges score candidates that are not stored (a
  prompt optimiser's validation answers), combined as ``[selection] combine`` combines
  them, each candidate compared within its prompt object; returns a score or None each.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from loop.components import Generator
    from loop.config import RunConfig
    from loop.policy import Policy
    from loop.store import Store


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from the run seed and any labels (round, phase, component)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Context:
    config: RunConfig
    run_dir: Path
    round: int
    phase: str
    adapter: str | None
    policy_label: str
    store: Store
    generator: Generator | None = None
    system: str | None = None
    cache_dir: Path | None = None
    lora_rank: int | None = None
    reported: dict[str, float] = field(default_factory=dict)  # ctx.metric(...) values
    _policy_factory: Callable[[], Policy] | None = None
    _progress: Callable[..., None] | None = None
    _event: Callable[..., None] | None = None
    _score: Callable[..., list] | None = None

    @property
    def seed(self) -> int:
        return derive_seed(self.config.seed, self.round, self.phase)

    def rng(self, *labels: object) -> random.Random:
        """A ``random.Random`` seeded from (run seed, round, phase, labels)."""
        return random.Random(derive_seed(self.config.seed, self.round, self.phase, *labels))

    def derive_seed(self, *labels: object) -> int:
        return derive_seed(self.config.seed, self.round, self.phase, *labels)

    def policy(self) -> Policy:
        if self._policy_factory is None:
            raise RuntimeError("this run has no transformers policy")
        return self._policy_factory()

    def progress(self, done: int, total: int | None = None, **metrics: float) -> None:
        if self._progress is not None:
            self._progress(done=done, total=total, metrics=metrics)

    def metric(self, name: str, value: float) -> None:
        """Record ``name`` (a ``group/name`` key) for this round; the last value wins.

        The runner stores these with the phase's own metrics when the phase commits, so
        a failed phase leaves none behind.
        """
        if "/" not in name:
            raise ValueError(f"metric names must be group/name, got {name!r}")
        self.reported[name] = float(value)

    def chat(self, text: str) -> list[dict[str, str]]:
        """``text`` as a user message, after the deployed system instruction if any."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": text}]

    def score(self, candidates: list) -> list[float | None]:
        """The run's judges on ``candidates`` (nothing stored): one combined score each."""
        if self._score is None:
            raise RuntimeError("this context has no judges to score with")
        return self._score(candidates)

    def event(self, message: str, *, level: str = "info", **data: Any) -> None:
        if self._event is not None:
            self._event(message=message, level=level, data=data)

    def template(self, name: str, required: set[str] | frozenset[str] = frozenset(),
                 optional: set[str] | frozenset[str] = frozenset()):
        from loop.templates import load_template

        return load_template(name, required, base=self.config.source_dir, optional=optional)
