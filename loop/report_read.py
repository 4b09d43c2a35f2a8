"""What ``report --html`` and ``compare`` read from a run database, in one pass.

``read_run(store)`` returns a ``RunReport``: the run row and its resolved config, every
metric per round, every training step (with a run-wide step counter), phase timings,
generation and selection lengths, a few example pairs per round with the judges' raw
text, OPRO's instruction history and the prompt rewrites used. Plain data: the plots
(loop/plots.py) and the HTML (loop/html_report.py) only format it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loop.store import Store

# Metric groups in the order a report shows them (others follow alphabetically).
GROUP_ORDER = ("eval", "judge", "select", "rewards", "train", "generate", "prompts")
PHASES = ("propose", "optimise", "generate", "judge", "select", "update", "evaluate")


@dataclass
class RunReport:
    name: str
    path: Path
    status: str
    rounds: int
    config: dict
    run: dict
    metrics: dict[int, dict[str, float]]  # {round: {group/name: value}}
    steps: list[dict] = field(default_factory=list)  # {round, step, global_step, loss, ...}
    phase_seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    round_seconds: dict[int, float] = field(default_factory=dict)
    lengths: dict[int, list[int]] = field(default_factory=dict)  # candidate tokens per round
    pair_lengths: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # (chosen, rejected)
    margins: dict[int, list[float]] = field(default_factory=dict)  # selected pairs' score margins
    examples: dict[int, list[dict]] = field(default_factory=dict)
    instructions: list[dict] = field(default_factory=list)
    rewrites: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # warnings and errors

    def groups(self) -> dict[str, list[str]]:
        """Metric names by ``group/`` prefix, groups in report order."""
        by: dict[str, set[str]] = {}
        for values in self.metrics.values():
            for name in values:
                by.setdefault(name.partition("/")[0], set()).add(name)
        order = [g for g in GROUP_ORDER if g in by] + sorted(g for g in by if g not in GROUP_ORDER)
        return {g: sorted(by[g]) for g in order}

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(rounds, values) of one metric, rounds without a value left out."""
        xs, ys = [], []
        for r in sorted(self.metrics):
            v = self.metrics[r].get(name)
            if v is not None and v == v:
                xs.append(r)
                ys.append(v)
        return xs, ys


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"updater": {"beta": 0.1}, "judges": [{"name": "x"}]}`` -> ``updater.beta``,
    ``judges.0.name``; lists of plain values stay one JSON value."""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            out.update(flat_config({str(i): v for i, v in enumerate(value)}, name + "."))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def read_run(store: Store, examples_per_round: int = 3) -> RunReport:
    run = store.run_row() or {}
    try:
        config = json.loads(run.get("config") or "{}")
    except ValueError:
        config = {}
    rep = RunReport(
        name=run.get("name", "?"), path=Path(store.path).parent, status=run.get("status", "?"),
        rounds=run.get("rounds") or 0, config=config, run=run, metrics=store.metrics(),
    )
    for i, row in enumerate(store.rows("select * from train_steps order by round, step, id")):
        rep.steps.append({
            "round": row["round"], "step": row["step"], "global_step": i + 1,
            "loss": row["loss"], "learning_rate": row["learning_rate"],
            "grad_norm": row["grad_norm"], **json.loads(row["metrics"] or "{}"),
        })
    for p in store.phases():
        if p["status"] == "done" and p["seconds"] is not None:
            rep.phase_seconds.setdefault(p["round"], {})[p["phase"]] = p["seconds"]
    rep.round_seconds = {r["round"]: r["seconds"] for r in store.rounds() if r["seconds"] is not None}
    for row in store.rows("select round, num_tokens from candidates where num_tokens is not null "
                          "and source = 'policy'"):
        rep.lengths.setdefault(row["round"], []).append(row["num_tokens"])
    for row in store.rows(
        "select p.round, p.margin, ch.num_tokens as c, rj.num_tokens as r from pairs p "
        "join candidates ch on ch.id = p.chosen_id join candidates rj on rj.id = p.rejected_id "
        "where p.selected = 1 order by p.id"
    ):
        if row["margin"] is not None:
            rep.margins.setdefault(row["round"], []).append(row["margin"])
        if row["c"] is not None and row["r"] is not None:
            rep.pair_lengths.setdefault(row["round"], []).append((row["c"], row["r"]))
    rep.examples = _examples(store, examples_per_round)
    rep.instructions = store.rows(
        "select round, optimiser, step, text, score, scored_on, chosen from instructions "
        "order by round, step, id") if _has_table(store, "instructions") else []
    rep.rewrites = store.rows(
        "select p.round, o.text as original, p.text as rewrite, p.source, "
        "exists(select 1 from round_prompts rp where rp.prompt_id = p.id) as used "
        "from prompts p join prompts o on o.id = p.parent_id where p.kind = 'rewrite' "
        "order by p.round, p.id")
    rep.events = store.rows("select round, phase, level, message, plugin from events "
                            "where level != 'info' order by id")
    return rep


def _has_table(store: Store, name: str) -> bool:
    return bool(store.rows("select 1 from sqlite_master where type = 'table' and name = ?", [name]))


def _examples(store: Store, per_round: int) -> dict[int, list[dict]]:
    """The first few selected pairs of each round, with every judge sample of both answers."""
    out: dict[int, list[dict]] = {}
    rows = store.rows(
        "select * from (select p.id, p.round, p.chosen_id, p.rejected_id, p.chosen_score, "
        "p.rejected_score, p.margin, p.source, pr.text as prompt, ch.text as chosen, "
        "rj.text as rejected, row_number() over (partition by p.round order by p.id) as k "
        "from pairs p join prompts pr on pr.id = p.prompt_id "
        "join candidates ch on ch.id = p.chosen_id join candidates rj on rj.id = p.rejected_id "
        "where p.selected = 1) where k <= ? order by round, id", [per_round])
    ids = [r["chosen_id"] for r in rows] + [r["rejected_id"] for r in rows]
    raws: dict[int, list[dict]] = {}
    if ids:
        marks = ",".join("?" * len(ids))
        for j in store.rows(f"select candidate_id, judge, sample_index, score, raw from judgments "
                            f"where candidate_id in ({marks}) order by id", ids):
            raws.setdefault(j["candidate_id"], []).append(j)
    for r in rows:
        r["chosen_judgments"] = raws.get(r["chosen_id"], [])
        r["rejected_judgments"] = raws.get(r["rejected_id"], [])
        out.setdefault(r["round"], []).append(r)
    return out


def open_run(run_dir: str | Path) -> RunReport:
    """Read a run folder read-only (a clear error when it is not one)."""
    from loop.monitor import open_reader

    store = open_reader(run_dir)
    try:
        return read_run(store)
    finally:
        store.close()
