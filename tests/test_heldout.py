"""Held-out prompts: a dataset split is never proposed and is the same on resume; a
held-out prompt that reaches generation is refused with an error naming both sources."""

from __future__ import annotations

import json
import types

from loop import plugins
from loop.config import ComponentSpec
from tests.core_helpers import cli, fake_config, ro_connect


def _dataset(path, **kw):
    return plugins.build_component("prompt_source", ComponentSpec(name="dataset", path=str(path), **kw),
                                   "prompts[0]")


def test_dataset_split_is_never_proposed(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(20)))
    src = _dataset(f, per_round=15)
    held = src.split_heldout(5, seed=3)
    assert len(held) == 5 and all(p.answer is not None and p.meta["key"].startswith(str(f)) for p in held)
    proposed = src.propose(types.SimpleNamespace(round=1, config=types.SimpleNamespace(seed=3)))
    proposed += src.propose(types.SimpleNamespace(round=2, config=types.SimpleNamespace(seed=3)))
    assert len(proposed) == 30 and not {p.text for p in held} & {p.text for p in proposed}
    again = _dataset(f, per_round=15).split_heldout(5, seed=3)  # a resumed process
    assert [p.text for p in again] == [p.text for p in held]


def _leaky_config(tmp_path, train_lines, heldout_lines):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in train_lines))
    held.write_text("".join(json.dumps({"prompt": t, "answer": "yes"}) + "\n" for t in heldout_lines))
    text = fake_config(tmp_path / "runs", rounds=1, extra=(
        "[[evaluators]]\nname = \"verify\"\nlabel = \"held\"\n"
        f"path = {json.dumps(str(held))}\nmax_new_tokens = 8\n"))
    text = text.replace('[[prompts]]\nname = "fake"\nper_round = 5',
                        f'[[prompts]]\nname = "dataset"\npath = {json.dumps(str(train))}\nper_round = 3')
    config = tmp_path / "c.toml"
    config.write_text(text)
    return config


def test_heldout_leakage_is_refused_naming_both_sources(tmp_path):
    config = _leaky_config(tmp_path, ["a", "b", "the shared one"], ["the shared one", "c"])
    proc = cli("run", str(config), "--progress", "off", check_rc=2)
    err = proc.stderr.strip().splitlines()[-1]
    assert "round 1 generate: prompt \"the shared one\" from prompt source 'dataset'" in err, err
    assert "held-out prompt of evaluator 'held' (from " + str(tmp_path / "held.jsonl") + ")" in err, err
    db = tmp_path / "runs" / "fake" / "run.db"
    conn = ro_connect(db)
    try:
        assert conn.execute("select count(*) from candidates").fetchone()[0] == 0  # nothing generated
        rows = conn.execute("select evaluator, split, text from heldout order by position").fetchall()
        assert [tuple(r) for r in rows] == [("held", "file", "the shared one"), ("held", "file", "c")]
        assert conn.execute("select status from phases where round = 1 and phase = 'generate'"
                            ).fetchone()[0] == "failed"
    finally:
        conn.close()


def test_a_split_needs_a_source_that_can_split(tmp_path):
    text = fake_config(tmp_path / "runs", rounds=1, extra="[[evaluators]]\nname = \"verify\"\nheldout = 3\n")
    (tmp_path / "c.toml").write_text(text)
    proc = cli("run", str(tmp_path / "c.toml"), "--progress", "off", check_rc=2)
    assert "evaluators[1].heldout: prompt source 'fake' (fake) cannot split held-out prompts" in proc.stderr
    assert not (tmp_path / "runs" / "fake").exists()
