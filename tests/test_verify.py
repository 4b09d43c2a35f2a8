"""Answer checking (plugins/verification.py), the `verify` judge, and reference answers
carried by the dataset and tinyworld prompt sources."""

from __future__ import annotations

import json
import random
import types

import pytest

import loop
from loop import plugins
from loop.config import ComponentSpec
from loop.errors import ConfigError
from plugins.tinyworld import task
from plugins.verification import Verifier, VerifyOptions, last_boxed, last_number


def verifier(**kw) -> Verifier:
    return Verifier(VerifyOptions(**kw))


def test_extractors():
    assert last_number("so 3 apples, then 1,234.5 total.") == 1234.5
    assert last_number("-7 and +2") == 2 and last_number("x = -7") == -7
    assert last_number("no digits") is None
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{open") is None


@pytest.mark.parametrize("options, answer, reference, score, failed", [
    ({"extract": "exact"}, "  a  b c\n", "a b c", 1.0, False),
    ({"extract": "exact"}, "a b c d", "a b c", 0.0, False),
    ({"extract": "last_number"}, "3 + 4 = 7", "7", 1.0, False),
    ({"extract": "last_number"}, "it is 7.0", "7", 1.0, False),
    ({"extract": "last_number"}, "7 then 8", "7", 0.0, False),
    ({"extract": "last_number"}, "seven", "7", 0.0, True),
    ({"extract": "boxed"}, r"thus \boxed{ 42 }", "42", 1.0, False),
    ({"extract": "boxed"}, r"thus \boxed{42.0}", r"\boxed{42}", 1.0, False),
    ({"extract": "boxed"}, "42", "42", 0.0, True),
    ({"extract": "regex", "pattern": r"Answer:\s*(\w+)"}, "Answer: no\nAnswer: yes", "yes", 1.0, False),
    ({"extract": "regex", "pattern": r"Answer:\s*(\w+)"}, "yes", "yes", 0.0, True),
])
def test_check(options, answer, reference, score, failed):
    got = verifier(**options).check("q", answer, reference)
    assert (got.score, got.failed) == (score, failed)


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="needs a `pattern`"):
        VerifyOptions(extract="regex")
    with pytest.raises(ValueError, match="only used with"):
        VerifyOptions(pattern="x")
    with pytest.raises(ValueError, match="not a valid regex"):
        VerifyOptions(extract="regex", pattern="(")
    with pytest.raises(ValueError, match='"package.module:name"'):
        VerifyOptions(function="nocolon")
    with pytest.raises(ValueError, match="cannot import"):
        VerifyOptions(function="no_such_module_xyz:f")


def test_user_function_beside_the_config(tmp_path):
    (tmp_path / "my_checks_eval.py").write_text(
        "def half(prompt, answer, reference):\n"
        "    return 0.5 if reference in answer else 0.0\n"
        "def bad(prompt, answer, reference):\n"
        "    return 2\n"
    )
    opts = VerifyOptions.model_validate({"function": "my_checks_eval:half"},
                                        context={"source_dir": str(tmp_path)})
    v = Verifier(opts, tmp_path)
    assert v.check("q", "it is 12", "12").score == 0.5
    bad = Verifier(VerifyOptions.model_validate({"function": "my_checks_eval:bad"},
                                                context={"source_dir": str(tmp_path)}), tmp_path)
    with pytest.raises(ValueError, match=r"score in \[0, 1\]"):
        bad.check("q", "a", "b")


def _judge(**options):
    return plugins.build_component("judge", ComponentSpec(name="verify", **options), "judges[0]")


def test_verify_judge_scores_tinyworld_candidates_like_the_task_verifier():
    rng = random.Random(0)
    judge = _judge()
    ctx = types.SimpleNamespace(config=types.SimpleNamespace(source_dir=None),
                                event=lambda *a, **k: None)
    src = plugins.build_component("prompt_source", ComponentSpec(name="tinyworld", per_round=20), "prompts[0]")
    prompts = src.propose(types.SimpleNamespace(rng=lambda *a: rng))
    assert all(p.answer == " ".join(sorted(task.parse_prompt(p.text).letters)) for p in prompts)
    cands = []
    for p in prompts:
        info = task.parse_prompt(p.text)
        for text in (info.answer, task.habit_answer(info), task.corrupt_answer(rng, info), f" {info.answer} "):
            cands.append(loop.Candidate(prompt=p, text=text))
    cands.append(loop.Candidate(prompt=loop.Prompt(text="no reference"), text="x"))
    res = judge.judge(ctx, cands)
    assert len(res.judgments) == len(cands) - 1 and res.metrics["judge/unreferenced"] == 1
    for j in res.judgments:
        assert j.score == float(task.verify(j.candidate.prompt.text, j.candidate.text))
        assert "reference:" in j.raw
    assert (res.outputs, res.truncated) == (0, 0)  # a verifier writes no text


def test_verify_judge_uses_the_original_answer_for_a_rewrite():
    orig = loop.Prompt(text="2+2?", answer="4")
    rewrite = loop.Prompt(text="What is two plus two?", parent=orig, kind="rewrite")
    ctx = types.SimpleNamespace(config=types.SimpleNamespace(source_dir=None), event=lambda *a, **k: None)
    res = _judge(extract="last_number").judge(ctx, [loop.Candidate(prompt=rewrite, text="it is 4")])
    assert [j.score for j in res.judgments] == [1.0]


def test_dataset_reads_reference_answers(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "1+1?", "answer": 2}, {"prompt": "name?", "answer": "Ada"}, {"prompt": "open"}]) + "\n")
    src = plugins.build_component("prompt_source", ComponentSpec(name="dataset", path=str(f), per_round=3,
                                                                 shuffle=False), "prompts[0]")
    src.setup(None)
    got = src.propose(types.SimpleNamespace(round=1, config=types.SimpleNamespace(seed=0)))
    assert [(p.text, p.answer) for p in got] == [("1+1?", "2"), ("name?", "Ada"), ("open", None)]
    f.write_text(json.dumps({"prompt": "x", "answer": ["a"]}) + "\n")
    with pytest.raises(ConfigError, match="row 1: 'answer' must be text or a number"):
        plugins.build_component("prompt_source", ComponentSpec(name="dataset", path=str(f)), "prompts[0]")
