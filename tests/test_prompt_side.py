"""Prompt-side components with a scripted generator: self_instruct, opro, bpo.

The generator and judge here are real plugins (registered for the test, unregistered
after) that return canned texts, so the exact prompts the components build, what they
keep, and how they score and link their results can be checked without a model.
"""

from __future__ import annotations

import re
import types

import pytest
import torch

import loop
from loop import plugins
from loop.config import ComponentSpec
from loop.context import Context
from loop.store import Store
from plugins.prompts.opro import meta_history, parse_instruction
from plugins.prompts.self_instruct import ngram_overlap, ngrams, parse_reply


class Scripted(loop.Generator):
    """Replies with ``respond(chat, sample_index)``; records every chat it was sent."""

    name = "scripted"
    respond = staticmethod(lambda chat, i: "")
    calls: list = []

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        Scripted.calls.append({"chats": list(chats), "adapter": adapter, "n": sampling.n})
        return [[loop.Completion(text=Scripted.respond(chat, i), num_tokens=1, finish_reason="stop")
                 for i in range(sampling.n)] for chat in chats]


class TableJudge(loop.Judge):
    """Scores an answer from a table (missing answers are parse failures)."""

    name = "table"
    table: dict[str, float] = {}

    def judge(self, ctx, candidates):
        return loop.JudgeResult(judgments=[
            loop.Judgment(candidate=c, score=TableJudge.table.get(c.text), raw="") for c in candidates
        ])


class _Plugin:
    @loop.hookimpl
    def register_generators(self, register):
        register(Scripted)

    @loop.hookimpl
    def register_judges(self, register):
        register(TableJudge)


@pytest.fixture(autouse=True)
def scripted():
    plugin = _Plugin()
    plugins.register(plugin, name="scripted-test")
    Scripted.calls = []
    yield
    plugins.unregister(plugin)


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "run.db")
    yield s
    s.close()


def ctx_for(store, tmp_path, round, phase, *, policy=None, adapter=None):
    config = types.SimpleNamespace(seed=3, source_dir=None,
                                   generate=types.SimpleNamespace(max_new_tokens=16, temperature=1.0,
                                                                  top_p=1.0),
                                   model=types.SimpleNamespace(device="cpu", dtype="float32", threads=None))
    return Context(config=config, run_dir=tmp_path, round=round, phase=phase, adapter=adapter,
                   policy_label="base", store=store, generator=Scripted(),
                   _policy_factory=(lambda: policy) if policy is not None else None)


def add_prompts(store, round, texts, kind="original"):
    store.start_phase(round, "propose")
    out = [loop.Prompt(text=t, source="test", kind=kind) for t in texts]
    with store.transaction() as db:
        for p in out:
            store.insert_prompt(db, p, round)
    return out


# -- self_instruct -----------------------------------------------------------------


def test_ngram_overlap_and_reply_parsing():
    assert ngrams("Sort the letters: a b", 3) == {("sort", "the", "letters"), ("the", "letters", "a"),
                                                   ("letters", "a", "b")}
    assert ngrams("hi there", 3) == {("hi", "there")}
    a, b = ngrams("write a poem about the sea", 3), ngrams("Write a POEM about the sea!", 3)
    assert ngram_overlap(a, b) == 1.0
    assert ngram_overlap(a, ngrams("list three prime numbers please", 3)) == 0.0
    assert parse_reply("  5. Name a colour.\n\nSure, that is it.") == "Name a colour."
    assert parse_reply("\n\n") == ""


def test_self_instruct_prompt_dedup_and_links(store, tmp_path):
    stored = add_prompts(store, 1, ["Write a poem about the sea", "List three prime numbers",
                                    "Explain how rain forms"])
    replies = iter(["Write a poem about the sea and sky",  # near-duplicate of a stored prompt
                    "Describe a cat in two lines",
                    "4. describe a cat in two lines",        # duplicate within the batch
                    "",                                       # empty
                    "Name the largest planet"])
    Scripted.respond = staticmethod(lambda chat, i: next(replies))
    comp = plugins.build_component("prompt_source", ComponentSpec(name="self_instruct", per_round=5,
                                                                  examples=2, max_overlap=0.5), "p")
    store.start_phase(2, "propose")
    ctx = ctx_for(store, tmp_path, 2, "propose")
    comp.setup(ctx)
    out = comp.propose(ctx)
    assert [p.text for p in out] == ["Describe a cat in two lines", "Name the largest planet"]
    # The request: k stored examples as a numbered list, then the next number.
    chats = Scripted.calls[0]["chats"]
    assert len(chats) == 5 and Scripted.calls[0]["adapter"] is None
    by_text = {p.text: p.id for p in stored}
    for chat, p in zip([chats[1], chats[4]], out):
        listed = re.findall(r"^(\d+)\. ?(.*)$", chat[0]["content"], re.M)
        assert [n for n, _ in listed] == ["1", "2", "3"] and listed[-1][1] == ""
        shown = [by_text[t] for _, t in listed[:2]]
        assert p.kind == "derived" and p.meta["derived_from"] == shown
        assert p.parent.id == shown[0]
    with store.transaction() as db:
        for p in out:
            store.insert_prompt(db, p, 2)
    rows = store.rows("select parent_id, kind from prompts where round = 2")
    assert all(r["kind"] == "derived" and r["parent_id"] in by_text.values() for r in rows)


def test_self_instruct_with_nothing_stored_proposes_nothing(store, tmp_path):
    store.start_phase(1, "propose")
    comp = plugins.build_component("prompt_source", ComponentSpec(name="self_instruct"), "p")
    assert comp.propose(ctx_for(store, tmp_path, 1, "propose")) == []
    assert Scripted.calls == []


def _reply_sequence(rounds: int, per_round: int) -> list[list[str]]:
    """Fixed replies: random texts over a small vocabulary and near-copies of earlier ones
    (a few words swapped), so overlaps fall below, at and above 0.7, across rounds."""
    import random

    rng = random.Random(11)
    vocab = [f"w{i}" for i in range(24)]
    earlier: list[str] = ["seed one two three four five"]
    out = []
    for _ in range(rounds):
        replies = []
        for _ in range(per_round):
            if rng.random() < 0.55:
                words = rng.choice(earlier).split()
                for _ in range(rng.randint(0, 3)):
                    words[rng.randrange(len(words))] = rng.choice(vocab)
            else:
                words = [rng.choice(vocab) for _ in range(rng.randint(1, 11))]
            replies.append(" ".join(words))
            earlier.append(replies[-1])
        out.append(replies)
    return out


def _brute_force_kept(replies, stored_texts, seeds, n, max_overlap):
    """The de-dup as it was: each reply against every stored prompt, seed and kept reply."""
    known = [ngrams(t, n) for t in [*stored_texts, *seeds]]
    kept = []
    for text in replies:
        grams = ngrams(text, n)
        if not grams or any(ngram_overlap(grams, k) >= max_overlap for k in known):
            continue
        known.append(grams)
        kept.append(text)
    return kept


def test_self_instruct_index_decides_like_comparing_with_every_prompt(store, tmp_path):
    """Six rounds of a fixed reply sequence (plus another source's prompts each round):
    the n-gram index keeps exactly what comparing with every stored prompt keeps; after
    its rows are deleted (a run older than m006) it is rebuilt, and after a redo of a
    propose (`resume --redo`) the discarded prompts leave it and the round decides again
    the same way."""
    from loop import integrity

    seeds = ["seed one two three four five"]
    opts = dict(per_round=12, examples=2, seeds=seeds, min_words=1, exclude_words=[], ngram=3,
                max_overlap=0.7)
    comp = plugins.build_component("prompt_source", ComponentSpec(name="self_instruct", **opts), "p")
    sequence = _reply_sequence(6, 12)
    decided = dropped = 0

    def propose(r):
        nonlocal decided, dropped
        replies = iter(sequence[r - 1])
        Scripted.respond = staticmethod(lambda chat, i: next(replies))
        stored = [x["text"] for x in store.rows("select text from prompts where round < ? order by id", [r])]
        store.start_phase(r, "propose")
        ctx = ctx_for(store, tmp_path, r, "propose")
        out = comp.propose(ctx)
        want = _brute_force_kept(sequence[r - 1], stored, seeds, 3, 0.7)
        assert [p.text for p in out] == want, f"round {r}"
        decided += len(sequence[r - 1])
        dropped += len(sequence[r - 1]) - len(want)
        others = [loop.Prompt(text=t, source="other") for t in sequence[r - 1][::5]]
        with store.transaction() as db, store.batch(db) as rows:
            for p in out + others:  # the kept ones, and another source's (duplicates or not)
                rows.prompt(p, r)
        return out

    for r in (1, 2, 3):
        propose(r)
    indexed = store.rows("select count(distinct prompt_id) as n from prompt_ngrams")[0]["n"]
    assert indexed == len(store.rows("select id from prompts where round < 3"))
    store.conn.execute("delete from prompt_ngrams")  # lost: the next propose rebuilds it
    propose(4)
    assert store.rows("select count(distinct prompt_id) as n from prompt_ngrams")[0]["n"] == \
        len(store.rows("select id from prompts where round < 4"))
    propose(5)
    integrity.redo(store, tmp_path, "round-4.propose")  # rounds 4 and 5 discarded
    assert not store.rows("select 1 from prompt_ngrams where round >= 4")
    for r in (4, 5, 6):
        propose(r)
    grams = store.rows("select prompt_id, count(*) as k, min(grams) as g, max(grams) as h "
                       "from prompt_ngrams where n = 3 group by prompt_id")
    texts = {x["id"]: x["text"] for x in store.rows("select id, text from prompts")}
    assert all(x["k"] == x["g"] == x["h"] == len(ngrams(texts[x["prompt_id"]], 3)) for x in grams)
    assert 0 < dropped < decided  # the sequence exercises both decisions
    # The examples are drawn as positions in the pool: the same draws as from the pool.
    import random
    for size, k in ((1, 4), (3, 2), (50, 4), (2000, 4)):
        pool = [f"p{i}" for i in range(size)]
        a, b = random.Random(size), random.Random(size)
        assert [a.sample(pool, min(k, size)) for _ in range(5)] == \
            [[pool[j] for j in b.sample(range(size), min(k, size))] for _ in range(5)]
    # A lookup seeks the primary key once per n-gram: no walk over the whole index.
    from plugins.prompts.self_instruct import NgramIndex
    plan = store.conn.execute("explain query plan " + NgramIndex.lookup_sql(3),
                              [3, 9, "a b c", "b c d", "c d e"]).fetchall()
    assert [row[-1] for row in plan] == ["SEARCH prompt_ngrams USING PRIMARY KEY (n=? AND gram=?)"]


# -- opro ----------------------------------------------------------------------------

META = "Your task is to write a system instruction"


def test_opro_meta_prompt_scores_and_choice(store, tmp_path):
    prompts = add_prompts(store, 1, [f"question {i}" for i in range(6)])
    with store.transaction() as db:
        for text, score, chosen in (("A", 2.0, 0), ("B", 0.5, 0), ("C", 4.0, 1), ("D", None, 0)):
            store.insert_instruction(db, loop.Instruction(text=text, score=score, chosen=bool(chosen),
                                                          optimiser="opro", scored_on=3), 1)
    store.start_phase(2, "optimise")

    def respond(chat, i):
        if chat[-1]["content"].startswith(META):
            return ["<INS>Be brief.</INS>", "<INS>be   BRIEF.</INS>", "Think step by step.", "<INS> </INS>"][i]
        return chat[0]["content"] if chat[0]["role"] == "system" else "plain"

    Scripted.respond = staticmethod(respond)
    TableJudge.table = {"C": 1.0, "Be brief.": 3.0, "Think step by step.": 2.0}
    comp = plugins.build_component("prompt_optimiser", ComponentSpec(
        name="opro", judge={"name": "table"}, proposals=4, score_prompts=3, exemplars=2), "o")
    ctx = ctx_for(store, tmp_path, 2, "optimise")
    comp.setup(ctx)
    res = comp.optimise(ctx, prompts)
    # The meta-prompt: best past instructions, one per text at its latest score, ascending.
    meta = next(c["chats"][0][0]["content"] for c in Scripted.calls if c["n"] == 4)
    assert re.findall(r"Instruction: (.*)\nScore: (.*)", meta) == [("B", "0.50"), ("C", "1.00"), ("A", "2.00")]
    requests = re.findall(r"^Request: (.*)$", meta, re.M)
    assert len(requests) == 2 and set(requests) <= {p.text for p in prompts}
    # Step 0 re-scores round 1's choice and no instruction at all (the baseline: "plain"
    # answers, unscored here); duplicates (case, spacing) and empty ones dropped.
    assert [(i.text, i.step, i.score, i.scored_on) for i in res.instructions] == [
        ("C", 0, 1.0, 3), ("", 0, None, 0), ("Be brief.", 1, 3.0, 3), ("Think step by step.", 1, 2.0, 3)]
    assert [i.chosen for i in res.instructions] == [False, False, True, False]
    assert res.system == "Be brief." and res.prompts == prompts and res.deploy
    assert res.metrics == {"opro/proposed": 2.0, "opro/duplicates": 2.0, "opro/best_score": 3.0,
                           "opro/mean_score": 2.0, "opro/instruction_chosen": 1.0}
    # Answers were written with each instruction as the system message, by the policy.
    answer_chats = [ch for c in Scripted.calls if c["n"] == 1 for ch in c["chats"]]
    assert sum(ch[0] == {"role": "system", "content": "Be brief."} for ch in answer_chats) == 3


def test_opro_first_round_scores_the_initial_instruction(store, tmp_path):
    prompts = add_prompts(store, 1, ["q1", "q2"])
    store.start_phase(1, "optimise")
    Scripted.respond = staticmethod(
        lambda chat, i: "<INS>Answer well.</INS>" if chat[-1]["content"].startswith(META)
        else (chat[0]["content"] if chat[0]["role"] == "system" else "plain"))
    TableJudge.table = {"plain": 1.0}  # "Answer well." answers never parse
    comp = plugins.build_component("prompt_optimiser", ComponentSpec(
        name="opro", judge={"name": "table"}, proposals=1), "o")
    ctx = ctx_for(store, tmp_path, 1, "optimise")
    res = comp.optimise(ctx, prompts)
    assert [(i.text, i.score, i.scored_on, i.chosen) for i in res.instructions] == [
        ("", 1.0, 2, True), ("Answer well.", None, 0, False)]
    assert res.system is None  # the empty instruction: no system message
    assert "Instruction: (no instruction)\nScore: 1.00" in Scripted.calls[1]["chats"][0][0]["content"]


def test_opro_unknown_judge_is_a_config_error():
    with pytest.raises(loop.ConfigError, match="unknown judge"):
        plugins.build_component("prompt_optimiser", ComponentSpec(name="opro", judge={"name": "nope"}), "o")


def test_meta_history_and_parse():
    assert meta_history([("x", 1.0), ("y", 3.0), ("x", 2.0), ("z", 0.0)], 2) == [
        {"text": "x", "score": "2.00"}, {"text": "y", "score": "3.00"}]
    assert parse_instruction("blah <INS> Be\n concise. </INS> more") == "Be concise."
    assert parse_instruction("  no tags  here ") == "no tags here"


# -- bpo -----------------------------------------------------------------------------

IMPROVE = "A user sent the request below"
REWRITE = "Improve this request"


def add_pair(store, round, prompt, chosen, rejected):
    a = loop.Candidate(prompt=prompt, text=chosen)
    b = loop.Candidate(prompt=prompt, text=rejected, sample_index=1)
    with store.transaction() as db:
        store.insert_pair(db, loop.Pair(prompt=prompt, chosen=a, rejected=b, chosen_score=4.0,
                                        rejected_score=1.0), round, selected=True)


def bpo_respond(chat, i):
    text = chat[-1]["content"]
    if text.startswith(IMPROVE):
        return "Sort these letters: c a, answer with letters only"
    if text.startswith(REWRITE):
        original = text.splitlines()[-1]
        return {"q1": "q1, answer briefly", "q2": "  Q2 ", "q3": ""}[original]
    return "?"


@pytest.mark.parametrize("keep_original", [False, True])
def test_bpo_trains_a_rewriter_and_links_rewrites(store, tmp_path, tiny_policy, keep_original):
    [p1] = add_prompts(store, 1, ["Sort: c a"])
    add_pair(store, 1, p1, "a c", "c a")
    incoming = add_prompts(store, 2, ["q1", "q2", "q3"])
    Scripted.respond = staticmethod(bpo_respond)
    comp = plugins.build_component("prompt_optimiser", ComponentSpec(
        name="bpo", keep_original=keep_original, gate=False, train={"max_steps": 2, "batch_size": 2}),
        "b")
    ctx = ctx_for(store, tmp_path, 2, "optimise", policy=tiny_policy)
    comp.setup(ctx)
    res = comp.optimise(ctx, incoming)
    # Training data: the pair's prompt, with both answers, improved by the policy.
    improve_chat = Scripted.calls[0]["chats"][0][0]["content"]
    assert "Sort: c a" in improve_chat and "a c" in improve_chat and Scripted.calls[0]["adapter"] is None
    [example] = res.new_prompts
    assert example.kind == "rewrite" and example.parent.id == p1.id and example.meta["bpo"] == "train"
    # The rewriter: a PEFT folder, used as the adapter for rewriting.
    folder = tmp_path / "adapters" / "bpo-round-2"
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert Scripted.calls[1]["adapter"] == str(folder)
    # Only q1 changed (q2's rewrite equals it up to case and spacing; q3's is empty).
    rw = next(p for p in res.prompts if p.kind == "rewrite")
    assert rw.text == "q1, answer briefly" and rw.parent is incoming[0]
    assert rw.meta == {"bpo": "rewrite", "adapter": "adapters/bpo-round-2"}
    expected = ([incoming[0], rw] if keep_original else [rw]) + incoming[1:]
    assert res.prompts == expected
    assert res.metrics["bpo/rewrite_rate"] == pytest.approx(1 / 3)
    assert res.metrics["bpo/train_examples"] == 1.0
    assert [(d.prompt, d.rewrite, d.kept, d.reason) for d in res.decisions] == [
        (incoming[0], rw, True, "ungated")]


def test_bpo_without_pairs_passes_prompts_through(store, tmp_path):
    incoming = add_prompts(store, 1, ["q1"])
    comp = plugins.build_component("prompt_optimiser", ComponentSpec(name="bpo"), "b")
    res = comp.optimise(ctx_for(store, tmp_path, 1, "optimise"), incoming)
    assert res.prompts == incoming and res.new_prompts == [] and Scripted.calls == []
    assert res.metrics["bpo/rewrite_rate"] == 0.0
    assert not (tmp_path / "adapters").exists()


def test_bpo_score_delta(store, tmp_path):
    [orig] = add_prompts(store, 1, ["q1"])
    rw = loop.Prompt(text="q1 better", source="bpo", kind="rewrite", parent=orig, meta={"bpo": "rewrite"})
    cands = [loop.Candidate(prompt=orig, text="o1"), loop.Candidate(prompt=orig, text="o2"),
             loop.Candidate(prompt=rw, text="r1")]
    scores = {"o1": [1.0, 3.0], "o2": [1.0, None], "r1": [4.0]}  # orig: mean(2, 1) = 1.5
    with store.transaction() as db:
        store.insert_prompt(db, rw, 1)
        for i, p in enumerate((orig, rw)):
            db["round_prompts"].insert({"round": 1, "position": i, "prompt_id": p.id, "system": None})
        for c in cands:
            for s in scores[c.text]:
                store.insert_judgment(db, loop.Judgment(candidate=c, score=s, judge="j"), 1)
    ev = plugins.build_component("evaluator", ComponentSpec(name="bpo"), "e")
    assert ev.evaluate(ctx_for(store, tmp_path, 1, "evaluate")) == {"bpo/score_delta": 2.5,
                                                                    "bpo/compared": 1.0}


def test_self_instruct_in_a_run_links_derived_prompts(tmp_path):
    """Through the runner (fake components): round 2 adds derived prompts, stored and answered."""
    from tests.core_helpers import rows, run_inprocess, write_config

    extra = '[[prompts]]\nname = "self_instruct"\nper_round = 6\nexamples = 2\nngram = 1\nmax_overlap = 1.0\n'
    run_dir = run_inprocess(write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=2, extra=extra))
    db = run_dir / "run.db"
    assert rows(db, "select count(*) n from prompts where kind = 'derived' and round = 1") == [{"n": 0}]
    derived = rows(db, "select * from prompts where kind = 'derived' and round = 2")
    assert derived and all(p["source"] == "self_instruct" for p in derived)
    round1 = {r["id"] for r in rows(db, "select id from prompts where round = 1")}
    for p in derived:
        meta = __import__("json").loads(p["meta"])
        assert p["parent_id"] == meta["derived_from"][0] and set(meta["derived_from"]) <= round1
    answered = {r["prompt_id"] for r in rows(db, "select prompt_id from round_prompts where round = 2")}
    assert {p["id"] for p in derived} <= answered
    texts = [p["text"].lower() for p in derived]
    assert len(set(texts)) == len(texts)  # no duplicates within the batch


# -- the gates: bpo rewrites kept only where better, self_instruct filters, opro options --


def gate_ctx(store, tmp_path, policy, judged):
    """A context whose ``ctx.score`` is the table judge, combined as the runner does."""
    from loop.combine import combine

    ctx = ctx_for(store, tmp_path, 2, "optimise", policy=policy)

    def score(cands):
        judged.extend(c.prompt.text for c in cands)
        res = TableJudge().judge(ctx, cands)
        rows = [(id(j.candidate), id(j.candidate.prompt), "table", j.score) for j in res.judgments]
        got, _ = combine(rows, {}, "mean")
        return [got.get(id(c)) for c in cands]

    ctx._score = score
    return ctx


GATE_REWRITES = {"q1": "q1 better", "q2": "q2 worse", "q3": "q3 better", "q4": "q4 same", "q5": "q5 x"}


def gate_respond(chat, i):
    text = chat[-1]["content"]
    if text.startswith(IMPROVE):
        return "Sort these letters: c a, answer with letters only"
    if text.startswith(REWRITE):
        return GATE_REWRITES[text.splitlines()[-1]]
    return "A:" + text  # an answer names the prompt it was written for


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_bpo_gate_keeps_rewrites_only_where_better(store, tmp_path, tiny_policy, threshold):
    [p1] = add_prompts(store, 1, ["Sort: c a"])
    add_pair(store, 1, p1, "a c", "c a")
    incoming = add_prompts(store, 2, ["q1", "q2", "q3", "q4", "q5"])
    Scripted.respond = staticmethod(gate_respond)
    TableJudge.table = {"A:q1": 1, "A:q1 better": 3, "A:q2": 2, "A:q2 worse": 1, "A:q3": 1,
                        "A:q3 better": 2, "A:q4": 2, "A:q4 same": 2, "A:q5": 1}  # q5's rewrite: unparsed
    comp = plugins.build_component("prompt_optimiser", ComponentSpec(
        name="bpo", keep_original=True, validation_prompts=4, answers=2, accept_threshold=threshold,
        train={"max_steps": 1, "batch_size": 2}), "b")
    judged = []
    ctx = gate_ctx(store, tmp_path, tiny_policy, judged)
    comp.setup(ctx)
    res = comp.optimise(ctx, incoming)
    # every answer, to an original or to its rewrite, is judged against the original prompt
    assert judged and set(judged) <= {"q1", "q2", "q3", "q4", "q5"}
    by = {d.prompt.text: d for d in res.decisions}
    assert set(by) == set(GATE_REWRITES) and sum(d.validation for d in res.decisions) == 4
    sample = [d for d in res.decisions if d.validation]
    deltas = [d.rewrite_score - d.original_score for d in sample if d.rewrite_score is not None]
    assert res.metrics["bpo/validation_delta"] == pytest.approx(sum(deltas) / len(deltas))
    if res.metrics["bpo/validation_delta"] > threshold:
        assert res.metrics["bpo/adopted"] == 1.0
        assert {t: (d.kept, d.reason) for t, d in by.items()} == {
            "q1": (True, "better"), "q2": (False, "not better"), "q3": (True, "better"),
            "q4": (False, "not better"), "q5": (False, "unscored")}
        assert (by["q1"].original_score, by["q1"].rewrite_score) == (1.0, 3.0)
        kept = [by["q1"].rewrite, by["q3"].rewrite]
        assert res.prompts == [incoming[0], kept[0], incoming[1], incoming[2], kept[1], *incoming[3:]]
        assert res.metrics["bpo/accepted_rate"] == pytest.approx(2 / 5)
    else:
        assert res.metrics["bpo/adopted"] == 0.0 and res.prompts == incoming
        assert all(not d.kept and d.reason == "rewriter rejected" for d in res.decisions)
        assert res.metrics["bpo/accepted_rate"] == 0.0
        # the prompts outside the validation sample were never answered
        assert all(d.original_score is None for d in res.decisions if not d.validation)


def test_self_instruct_filters_and_kept_rate(store, tmp_path):
    add_prompts(store, 1, ["Write a poem about the sea"])
    replies = iter(["Name a colour please",        # kept
                    "Hi",                          # too short
                    "word " * 200,                 # too long
                    "Draw a picture of a horse",   # an excluded word
                    "List three prime numbers"])   # kept
    Scripted.respond = staticmethod(lambda chat, i: next(replies))
    comp = plugins.build_component("prompt_source", ComponentSpec(name="self_instruct", per_round=5), "p")
    store.start_phase(2, "propose")
    ctx = ctx_for(store, tmp_path, 2, "propose")
    out = comp.propose(ctx)
    assert [p.text for p in out] == ["Name a colour please", "List three prime numbers"]
    assert ctx.reported["self_instruct/kept_rate"] == pytest.approx(2 / 5)
    assert {k: v for k, v in ctx.reported.items() if k.startswith("self_instruct/dropped")} == {
        "self_instruct/dropped_empty": 0, "self_instruct/dropped_short": 1,
        "self_instruct/dropped_long": 1, "self_instruct/dropped_excluded": 1,
        "self_instruct/dropped_duplicate": 0}


def test_opro_deploy_false_and_baseline_off(store, tmp_path):
    prompts = add_prompts(store, 1, ["q1", "q2"])
    store.start_phase(1, "optimise")
    Scripted.respond = staticmethod(
        lambda chat, i: "<INS>Answer well.</INS>" if chat[-1]["content"].startswith(META)
        else (chat[0]["content"] if chat[0]["role"] == "system" else "plain"))
    TableJudge.table = {"plain": 1.0, "Answer well.": 2.0}
    comp = plugins.build_component("prompt_optimiser", ComponentSpec(
        name="opro", judge={"name": "table"}, proposals=1, deploy=False, initial=["Start."],
        baseline=False), "o")
    res = comp.optimise(ctx_for(store, tmp_path, 1, "optimise"), prompts)
    assert [i.text for i in res.instructions] == ["Start.", "Answer well."]  # no "" baseline
    assert res.system == "Answer well." and res.deploy is False


def test_opro_optimiser_model_from_a_second_folder(store, tmp_path, tiny_model_dir, tiny_policy):
    """A second local model writes the proposals; the run's policy is never touched."""
    prompts = add_prompts(store, 1, ["q1"])
    store.start_phase(1, "optimise")
    Scripted.respond = staticmethod(lambda chat, i: "plain")
    TableJudge.table = {"plain": 1.0}
    comp = plugins.build_component("prompt_optimiser", ComponentSpec(
        name="opro", judge={"name": "table"}, proposals=2, model=tiny_model_dir, max_new_tokens=4), "o")
    before = {n: p.detach().clone() for n, p in tiny_policy.base.named_parameters()}
    res = comp.optimise(ctx_for(store, tmp_path, 1, "optimise", policy=tiny_policy), prompts)
    # the scripted generator only answered (n = 1); proposals came from the second model
    assert all(c["n"] == 1 for c in Scripted.calls)
    assert comp._model is not None and comp._model is not tiny_policy
    assert comp._model.base is not tiny_policy.base
    # both of its replies were read as proposals (new ones, or dropped as empty/duplicate)
    assert res.metrics["opro/proposed"] + res.metrics["opro/duplicates"] == 2
    for n, p in tiny_policy.base.named_parameters():
        assert torch.equal(before[n], p.detach())
    with pytest.raises(loop.ConfigError, match="not a folder"):
        plugins.build_component("prompt_optimiser", ComponentSpec(
            name="opro", judge={"name": "table"}, model=str(tmp_path / "nope")), "o")


def test_opro_optimiser_model_on_a_remote_endpoint(store, tmp_path):
    """The meta-prompt goes to an OpenAI-compatible server (a real local HTTP server);
    its replies are the proposals, scored on the policy as usual."""
    from test_remote_judge import ScriptedServer

    prompts = add_prompts(store, 1, ["q1"])
    store.start_phase(1, "optimise")
    Scripted.respond = staticmethod(
        lambda chat, i: chat[0]["content"] if chat[0]["role"] == "system" else "plain")
    TableJudge.table = {"plain": 1.0, "Be exact.": 2.0}
    with ScriptedServer([("ok", "<INS>Be exact.</INS>"), ("ok", "<INS>Be exact.</INS>")]) as server:
        comp = plugins.build_component("prompt_optimiser", ComponentSpec(
            name="opro", judge={"name": "table"}, proposals=2,
            remote={"url": server.url, "model": "optimiser", "backoff_s": 0.01}), "o")
        res = comp.optimise(ctx_for(store, tmp_path, 1, "optimise"), prompts)
    assert len(server.requests) == 2
    body = server.requests[0]["body"]
    assert body["model"] == "optimiser" and body["messages"][0]["content"].startswith(META)
    assert all(c["n"] == 1 for c in Scripted.calls)  # the policy only answered
    assert res.system == "Be exact." and res.metrics["opro/duplicates"] == 1.0
    with pytest.raises(loop.ConfigError, match="not both"):
        plugins.build_component("prompt_optimiser", ComponentSpec(
            name="opro", model=str(tmp_path), remote={"url": server.url, "model": "m"}), "o")
