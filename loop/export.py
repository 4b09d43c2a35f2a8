"""``selfloop export``: a run's training data in the formats other trainers read.

    selfloop export runs/demo --format trl-dpo -o pairs.jsonl
    selfloop export runs/demo --format trl-kto --round 2 -o round2.parquet

Formats (one row per example; ``round`` and the scores ride along as extra columns):

- ``trl-dpo``: ``prompt`` (the chat: the system message the generator used, then the user
  turn), ``chosen`` and ``rejected`` (each one assistant turn): TRL's conversational
  preference format, also what the alignment handbook reads. The selected pairs.
- ``trl-sft``: ``prompt`` and ``completion`` (conversational prompt-completion): the answers
  the loop trained towards: RAFT's ``top`` rows, KTO's ``desirable`` rows and the chosen
  answer of every selected pair (each candidate once).
- ``trl-kto``: ``prompt``, ``completion`` and ``label`` (true: desirable): the ``selected``
  table's desirable/undesirable rows, and each selected pair split into its chosen (true)
  and rejected (false) answer, as TRL does for paired data (each candidate and label once).
- ``jsonl``: the plain format: ``prompt`` and ``system`` as text, ``chosen``, ``rejected``.

The prompt is the chat the policy answered, so a trainer's chat template renders exactly
what the run's generator saw. Output is JSON Lines (stdout, ``.jsonl``, ``.json``) or
Parquet (``.parquet``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Callable

FORMATS = ("trl-dpo", "trl-sft", "trl-kto", "jsonl")
SUFFIXES = (".jsonl", ".json", ".parquet")

# The chat as the generator saw it: a prompt's own system message wins over the round's
# (runner._do_generate; round_prompts.system holds the round's choice).
_SYSTEM = "coalesce(pr.system, rp.system) as system"
_PAIRS = (
    "select x.id as pair_id, x.round, ch.id as chosen_id, ch.text as chosen, "
    "rj.id as rejected_id, rj.text as rejected, x.chosen_score, x.rejected_score, x.margin, "
    f"x.source, pr.text as prompt_text, {_SYSTEM} from pairs x "
    "join prompts pr on pr.id = x.prompt_id "
    "left join round_prompts rp on rp.round = x.round and rp.prompt_id = x.prompt_id "
    "join candidates ch on ch.id = x.chosen_id join candidates rj on rj.id = x.rejected_id "
    "where x.selected = 1"
)
_SELECTED = (
    "select x.round, x.candidate_id, c.text as completion, x.score, x.rank, x.label, "
    f"pr.text as prompt_text, {_SYSTEM} from selected x "
    "join candidates c on c.id = x.candidate_id join prompts pr on pr.id = c.prompt_id "
    "left join round_prompts rp on rp.round = x.round and rp.prompt_id = c.prompt_id"
)


def chat(row: dict) -> list[dict]:
    messages = [{"role": "system", "content": row["system"]}] if row["system"] else []
    return [*messages, {"role": "user", "content": row["prompt_text"]}]


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _where(sql: str, round_: int | None) -> tuple[str, list]:
    if round_ is None:
        return sql, []
    return f"{sql} and x.round = ?", [round_]


def _pairs(store, round_):
    sql, params = _where(_PAIRS, round_)
    return store.rows(sql + " order by x.id", params)


def _selected(store, round_, labels: tuple[str, ...]):
    sql, params = _where(_SELECTED + f" where x.label in ({', '.join('?' * len(labels))})", round_)
    return store.rows(sql + " order by x.id", [*labels, *params])


def trl_dpo(store, round_):
    for r in _pairs(store, round_):
        yield {"prompt": chat(r), "chosen": answer(r["chosen"]), "rejected": answer(r["rejected"]),
               "round": r["round"], "chosen_score": r["chosen_score"],
               "rejected_score": r["rejected_score"], "margin": r["margin"], "source": r["source"],
               "pair_id": r["pair_id"]}


def trl_sft(store, round_):
    seen = set()
    for r in _selected(store, round_, ("top", "desirable")):
        if r["candidate_id"] not in seen:
            seen.add(r["candidate_id"])
            yield {"prompt": chat(r), "completion": answer(r["completion"]), "round": r["round"],
                   "score": r["score"], "label": r["label"], "candidate_id": r["candidate_id"]}
    for r in _pairs(store, round_):
        if r["chosen_id"] not in seen:
            seen.add(r["chosen_id"])
            yield {"prompt": chat(r), "completion": answer(r["chosen"]), "round": r["round"],
                   "score": r["chosen_score"], "label": "chosen", "candidate_id": r["chosen_id"]}


def trl_kto(store, round_):
    seen = set()
    for r in _selected(store, round_, ("desirable", "undesirable")):
        key = (r["candidate_id"], r["label"] == "desirable")
        if key not in seen:
            seen.add(key)
            yield {"prompt": chat(r), "completion": answer(r["completion"]), "label": key[1],
                   "round": r["round"], "score": r["score"], "candidate_id": r["candidate_id"]}
    for r in _pairs(store, round_):
        for side, label in (("chosen", True), ("rejected", False)):
            key = (r[f"{side}_id"], label)
            if key not in seen:
                seen.add(key)
                yield {"prompt": chat(r), "completion": answer(r[side]), "label": label,
                       "round": r["round"], "score": r[f"{side}_score"],
                       "candidate_id": r[f"{side}_id"]}


def plain(store, round_):
    for r in _pairs(store, round_):
        yield {"round": r["round"], "prompt": r["prompt_text"], "system": r["system"],
               "chosen": r["chosen"], "rejected": r["rejected"], "chosen_score": r["chosen_score"],
               "rejected_score": r["rejected_score"], "margin": r["margin"], "source": r["source"]}


WRITERS: dict[str, Callable] = {"trl-dpo": trl_dpo, "trl-sft": trl_sft, "trl-kto": trl_kto,
                                "jsonl": plain}


def export_rows(store, fmt: str, round_: int | None = None) -> list[dict]:
    """The rows of ``fmt`` for one round (or all), read from an open (read-only) store."""
    return list(WRITERS[fmt](store, round_))


def write_jsonl(rows: list[dict], fh: IO[str]) -> None:
    for row in rows:
        fh.write(json.dumps(row) + "\n")


def write_parquet(rows: list[dict], out: IO[bytes]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), out)


def output_kind(path: str) -> str:
    """``jsonl`` or ``parquet`` from the output's name (``-`` is stdout: JSON Lines)."""
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        from loop.errors import UserError

        raise UserError(f"--output {path}: name a {', '.join(SUFFIXES)} file (or - for stdout)")
    return "parquet" if suffix == ".parquet" else "jsonl"
