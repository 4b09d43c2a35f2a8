"""Held-out prompts: split off before the run, recorded, and kept away from training.

An evaluator asks for held-out prompts with ``Evaluator.heldout_request()``: ``k``
prompts split off a prompt source (``PromptSource.split_heldout``: that source never
proposes them), or its own prompts from a file. ``prepare`` runs before round 0 in every
process: it asks for the split (the same ``(k, seed)`` each time, so a resumed run holds
out the same prompts and the source leaves them out again), records the set in the
``heldout`` table the first time and checks it is unchanged after that, and hands each
evaluator its prompts (``evaluator.heldout``). ``refuse_leaks`` is the generate phase's
gate: a prompt whose text (or source key) is held out never reaches generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from loop import components as c
from loop.errors import ConfigError, UserError


@dataclass
class HeldoutRequest:
    """What an evaluator asks for: ``k`` prompts split off prompt source ``source`` (its
    label; None: the first), or its own ``prompts`` read from ``file``."""

    k: int = 0
    source: str | None = None
    prompts: list[c.Prompt] = field(default_factory=list)
    file: str | None = None


def _source(comps, index: int, request: HeldoutRequest, file: str | None):
    sources = comps.prompt_sources
    if request.source is None:
        return sources[0]
    for s in sources:
        if s.label == request.source:
            return s
    raise ConfigError(
        f"no prompt source is labelled {request.source!r} (there are: "
        f"{', '.join(s.label for s in sources)}); name one of them", file=file,
        field=f"evaluators[{index}].source",
    )


def validate(config, comps) -> None:
    """At validation: every split names a prompt source that can split."""
    for i, ev in enumerate(comps.evaluators):
        req = ev.heldout_request()
        if req is None or not req.k:
            continue
        src = _source(comps, i, req, config.source_file)
        if type(src).split_heldout is c.PromptSource.split_heldout:
            raise ConfigError(
                f"prompt source {src.label!r} ({src.name}) cannot split held-out prompts off; "
                "give the evaluator its own `path` to a prompts file instead of `heldout`",
                file=config.source_file, field=f"evaluators[{i}].heldout",
            )


@dataclass
class Index:
    """Held-out texts and keys -> (evaluator label, where the prompt came from)."""

    texts: dict[str, tuple[str, str]] = field(default_factory=dict)
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)


def prepare(store, comps, seed: int) -> Index:
    """Split, record (first time) or check (resume), and hand out each evaluator's set."""
    index = Index()
    stored: dict[str, list[dict]] = {}
    for row in store.heldout():
        stored.setdefault(row["evaluator"], []).append(row)
    writes = []
    for i, ev in enumerate(comps.evaluators):
        req = ev.heldout_request()
        if req is None:
            continue
        if req.k:
            src = _source(comps, i, req, None)
            prompts = src.split_heldout(req.k, seed)
            split, origin = "heldout", src.label
        else:
            prompts, split, origin = req.prompts, "file", req.file or ev.label
        rows = stored.get(ev.label)
        if rows is not None and [r["text"] for r in rows] != [p.text for p in prompts]:
            raise UserError(
                f"evaluator {ev.label!r}: its held-out prompts differ from the ones this run "
                f"recorded before round 0 ({len(rows)} rows in the heldout table); restore "
                f"{origin} as it was, or start a new run"
            )
        if rows is None:
            writes.append((ev.label, split, origin, prompts))
        ev.heldout = prompts
        for p in prompts:
            index.texts.setdefault(p.text.strip(), (ev.label, origin))
            if p.meta.get("key"):
                index.keys.setdefault(p.meta["key"], (ev.label, origin))
    if writes:
        with store.transaction() as db:
            for label, split, origin, prompts in writes:
                store.insert_heldout(db, label, split, origin, prompts)
    return index


def refuse_leaks(prompts: list[c.Prompt], index: Index, round: int) -> None:
    """UserError naming both sources when a held-out prompt is about to be generated for."""
    for p in prompts:
        hit = index.texts.get(p.text.strip())
        key = (p.meta or {}).get("key")
        if hit is None and key:
            hit = index.keys.get(key)
        if hit is None:
            continue
        label, origin = hit
        shown = p.text if len(p.text) <= 80 else p.text[:77] + "..."
        raise UserError(
            f"round {round} generate: prompt {json.dumps(shown)} from prompt source "
            f"{p.source!r} is a held-out prompt of evaluator {label!r} (from {origin}); a "
            "held-out prompt must never reach training: remove it from one of the two, or "
            "hold out other prompts"
        )
