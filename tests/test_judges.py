"""The constitutional judges (SL-CAI revisions, RL-CAI preferences), the reward-model judge,
the judge-quality figures and the dashboard's length-bias warning.

The CAI judges run on the real transformers generator over the tiny random Llama (the
mechanics: linking, both orders, log-prob arithmetic) and, where exact texts matter, on a
scripted generator registered as a component like any other.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

import loop
from loop import judge_quality
from loop.config import JudgeSpec
from loop.errors import ConfigError
from loop.plugins import build_component
from plugins.generators.hf import HFGenerator
from plugins.judges.constitutional import (
    ConstitutionalJudge,
    ConstitutionalPreferenceJudge,
    load_constitution,
    preference_from_logprobs,
)
from plugins.judges.reward_model import RewardModelJudge

from conftest import build_tokenizer, make_context

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# The constitution file
# ---------------------------------------------------------------------------


def test_shipped_constitution_is_complete():
    c = load_constitution(ROOT / "prompts" / "constitution.toml")
    assert len(c.principles) >= 4
    for p in c.principles:
        assert p.critique and p.revision and p.compare


BAD_CONSTITUTIONS = {
    "missing-field": ('[[principles]]\nname = "a"\ncritique = "c"\ncompare = "q"\n',
                      "principles[0].revision: required field is missing"),
    "unknown-field": ('[[principles]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncompare = "q"\n'
                      'weight = 2\n', "principles[0].weight: unknown field"),
    "empty": ("", "principles: required field is missing"),
    "no-principles": ("principles = []\n", "principles: list should have at least 1 item"),
    "duplicate": ('[[principles]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncompare = "q"\n' * 2,
                  "principle names must be unique"),
    "syntax": ("[[principles]\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONSTITUTIONS))
def test_bad_constitution_is_a_config_error_naming_file_and_field(tmp_path, case):
    text, expected = BAD_CONSTITUTIONS[case]
    (tmp_path / "mine.toml").write_text(text)
    for name in ("constitutional", "constitutional_preference"):
        spec = JudgeSpec(name=name, constitution="mine.toml")
        with pytest.raises(ConfigError) as e:
            build_component("judge", spec, "judges[0]", "run.toml", source_dir=tmp_path)
        msg = str(e.value)
        assert msg.startswith("run.toml: judges[0]: constitution file ")
        assert str(tmp_path / "mine.toml") in msg and expected in msg, msg


def test_missing_constitution_and_unknown_principle(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml not found"):
        build_component("judge", JudgeSpec(name="constitutional", constitution="nope.toml"),
                        "judges[0]", "run.toml", source_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"principles \['kind'\] are not in constitution"):
        build_component("judge", JudgeSpec(name="constitutional", principles=["kind"]),
                        "judges[0]", "run.toml", source_dir=tmp_path)


def test_bad_constitution_exits_2_before_anything_is_written(tmp_path):
    from tests.core_helpers import cli, write_config

    (tmp_path / "bad.toml").write_text('[[principles]]\nname = "a"\n')
    extra = '[[judges]]\nname = "constitutional"\nconstitution = "bad.toml"\n'
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", extra=extra)
    proc = cli("run", str(config), "--progress", "off")
    assert proc.returncode == 2
    assert "judges[1]: constitution file" in proc.stderr and "principles[0].critique" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------
# SL-CAI: critique and revision
# ---------------------------------------------------------------------------


class RuleGenerator(loop.Generator):
    """Answers each request with ``reply(content)``; records every request."""

    name = "rule"

    def __init__(self, reply):
        super().__init__()
        self.reply = reply
        self.asked: list[str] = []

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        out = []
        for chat in chats:
            content = chat[-1]["content"]
            self.asked.append(content)
            text, reason = self.reply(content)
            out.append([loop.Completion(text=text, num_tokens=len(text.split()) + 1,
                                        finish_reason=reason)] * sampling.n)
        return out


def _between(text, start, end):
    """The last ``start`` ... ``end`` section (the few-shot examples come first)."""
    return text[text.rindex(start) + len(start): text.rindex(end)].strip()


def scripted_reviser(content):
    """Critiques name the request; revisions append '+' to the answer (or fail on cue)."""
    if content.startswith("Read the exchange"):
        return "critique of " + _between(content, "<<<ANSWER>>>", "<<<END ANSWER>>>"), "stop"
    answer = _between(content, "<<<ANSWER>>>", "<<<END ANSWER>>>")
    if answer.startswith("cut"):
        return "half a revis", "length"
    if answer.startswith("same"):
        return answer, "stop"
    return answer + " +", "stop"


def test_sl_cai_revisions_are_linked_candidates_and_offered_pairs():
    gen = RuleGenerator(scripted_reviser)
    ctx = make_context(generator=gen, phase="judge", source_dir=ROOT)
    p1, p2 = loop.Prompt(text="Q1", id=1), loop.Prompt(text="Q2", id=2)
    cands = [loop.Candidate(prompt=p1, text="alpha", id=1),
             loop.Candidate(prompt=p1, text="beta", id=2, sample_index=1),
             loop.Candidate(prompt=p2, text="cut me", id=3),
             loop.Candidate(prompt=p2, text="same", id=4, sample_index=1),
             loop.Candidate(prompt=p2, text="other judge's", id=5, source="revision")]
    judge = ConstitutionalJudge(ConstitutionalJudge.Options(passes=2), label="cai")
    judge.setup(ctx)
    res = judge.judge(ctx, cands)

    assert res.judgments == []  # it revises; it does not score
    assert [r.text for r in res.candidates] == ["alpha + +", "beta + +"]
    principles = {p.name: p for p in load_constitution(ROOT / "prompts" / "constitution.toml").principles}
    for rev, original in zip(res.candidates, cands[:2]):
        assert rev.source == "revision" and rev.parent is original and rev.prompt is original.prompt
        assert rev.policy == "base" and rev.id is None
        passes = rev.meta["passes"]
        assert [p["used"] for p in passes] == [True, True]
        assert passes[0]["critique"] == f"critique of {original.text}"
        assert passes[1]["critique"] == f"critique of {original.text} +"  # pass 2 revises pass 1
        assert all(p["principle"] in principles for p in passes)
    # the sampled principle's own requests were asked, and the candidate was delimited
    first = passes[0]["principle"]
    asked = [a for a in gen.asked if principles[first].critique in a]
    assert asked and all("<<<ANSWER>>>" in a for a in asked)
    assert [(p.chosen, p.rejected, p.source) for p in res.pairs] == [
        (res.candidates[0], cands[0], "cai"), (res.candidates[1], cands[1], "cai")]
    # 6 revision requests (4 in pass 1, 2 in pass 2), one cut at max_new_tokens
    assert res.metrics == {"cai/revised": 4.0, "cai/revisions": 2.0, "cai/failed": 1.0,
                           "cai/truncated": 1.0, "cai/unchanged": 1.0, "cai/length_ratio": pytest.approx(
                               (9 / 5 + 8 / 4) / 2), "cai/truncated_rate": pytest.approx(1 / 6)}
    # every critique and revision request opened with the constitution's two worked examples
    shots = load_constitution(ROOT / "prompts" / "constitution.toml").examples
    assert len(shots) >= 2
    for a in gen.asked:
        assert "Example 1." in a and "Example 2." in a and shots[0].critique in a
        assert a.index(shots[1].response) < a.rindex("<<<ANSWER>>>")
    assert all(shots[0].revision in a for a in gen.asked if a.startswith("Rewrite"))
    # the other judge's revision was not revised again
    assert not any("other judge's" in a for a in gen.asked)


def test_sl_cai_without_few_shot_examples():
    gen = RuleGenerator(scripted_reviser)
    ctx = make_context(generator=gen, phase="judge", source_dir=ROOT)
    cands = [loop.Candidate(prompt=loop.Prompt(text="Q", id=1), text="a", id=1)]
    res = ConstitutionalJudge(ConstitutionalJudge.Options(few_shot=0)).judge(ctx, cands)
    assert [r.text for r in res.candidates] == ["a +"]
    assert gen.asked and not any("Example 1." in a for a in gen.asked)


def test_constitution_examples_must_name_a_principle(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text('[[principles]]\nname = "p"\ncritique = "c"\nrevision = "r"\ncompare = "q"\n\n'
                   '[[examples]]\nprinciple = "nope"\nprompt = "x"\nresponse = "y"\n'
                   'critique = "z"\nrevision = "w"\n')
    with pytest.raises(ValueError, match="examples\\[0\\].principle 'nope' is not a principle"):
        load_constitution(bad)


def test_sl_cai_per_prompt_and_reproducible_principles():
    prompt = loop.Prompt(text="Q", id=1)
    cands = [loop.Candidate(prompt=prompt, text=f"a{i}", id=i, sample_index=i) for i in range(4)]
    runs = []
    for _ in range(2):
        ctx = make_context(generator=RuleGenerator(scripted_reviser), phase="judge", seed=3)
        judge = ConstitutionalJudge(ConstitutionalJudge.Options(per_prompt=2, passes=3))
        res = judge.judge(ctx, cands)
        runs.append([[p["principle"] for p in r.meta["passes"]] for r in res.candidates])
    assert len(runs[0]) == 2 and runs[0] == runs[1]


def test_sl_cai_on_the_tiny_model(tiny_policy):
    gen = HFGenerator()
    ctx = make_context(tiny_policy, generator=gen, phase="judge")
    prompt = loop.Prompt(text="Say hi.", id=1)
    cands = [loop.Candidate(prompt=prompt, text="hi", id=1), loop.Candidate(prompt=prompt, text="yo", id=2)]
    judge = ConstitutionalJudge(ConstitutionalJudge.Options(
        temperature=1.0, critique_max_new_tokens=8, revision_max_new_tokens=48))
    res = judge.judge(ctx, cands)
    m = res.metrics
    assert m["cai/revised"] == 2 and m["cai/revisions"] + m["cai/failed"] + m["cai/unchanged"] == 2
    for rev in res.candidates:
        assert rev.parent in cands and rev.text and rev.meta["passes"][0]["used"]


# ---------------------------------------------------------------------------
# RL-CAI: preferences from label log-probs, both orders
# ---------------------------------------------------------------------------


def test_preference_arithmetic_by_hand():
    # order 1: P(A) = sigmoid(ln 3) = 0.75; order 2: P(A) = sigmoid(ln 1) = 0.5
    p, bias, consistent = preference_from_logprobs((math.log(3), 0.0), (0.0, 0.0))
    assert p == pytest.approx((0.75 + 0.5) / 2)
    assert bias == pytest.approx((0.75 + 0.5) / 2 - 0.5)
    assert consistent is False  # 0.5 is not a preference for x
    # a judge that always says "A" prefers neither answer, and is all position bias
    p, bias, consistent = preference_from_logprobs((0.0, -5.0), (0.0, -5.0))
    assert p == pytest.approx(0.5) and bias == pytest.approx(1 / (1 + math.exp(-5)) - 0.5)
    # a consistent judge: x preferred in both orders
    p, bias, consistent = preference_from_logprobs((0.0, -2.0), (-2.0, 0.0))
    assert p == pytest.approx(1 / (1 + math.exp(-2))) and bias == pytest.approx(0) and consistent


def test_rl_cai_on_the_tiny_model_cancels_position(tiny_policy):
    gen = HFGenerator()
    ctx = make_context(tiny_policy, generator=gen, phase="judge")
    prompt = loop.Prompt(text="Pick a number.", id=1)
    a = loop.Candidate(prompt=prompt, text="seven", id=1)
    b = loop.Candidate(prompt=prompt, text="a much longer answer, 42", id=2)
    judge = ConstitutionalPreferenceJudge(
        ConstitutionalPreferenceJudge.Options(principles=["helpful"]), label="pref")
    res = judge.judge(ctx, [a, b])
    scores = {j.candidate.id: j.score for j in res.judgments}
    assert scores[1] + scores[2] == pytest.approx(1.0)
    # the same comparison with the candidates given the other way round: same scores,
    # because both orders are always asked
    flipped = judge.judge(ctx, [b, a])
    assert {j.candidate.id: j.score for j in flipped.judgments} == pytest.approx(scores)
    # the stored log-probs are the generator's for the replies "A" and "B"
    (j1,) = [j for j in res.judgments if j.candidate.id == 1]
    lps = j1.meta["comparisons"][0]["logprobs"]
    template = ctx.template("cai_preference", {"prompt", "first", "second", "question"})
    q = load_constitution(ROOT / "prompts" / "constitution.toml").principles[0].compare
    chat = [{"role": "user", "content": template.render(prompt=prompt.text, first=a.text,
                                                         second=b.text, question=q)}]
    assert gen.logprobs(ctx, [chat, chat], ["A", "B"], adapter=None) == pytest.approx(lps[:2], abs=1e-5)
    assert -0.5 <= res.metrics["judge/position_bias"] <= 0.5
    assert res.metrics["judge/comparisons"] == 1
    assert "P(preferred)" in j1.raw


def test_rl_cai_batched_labels_give_the_per_row_scores(tiny_policy):
    """hf: label_logprobs (each chat once, both labels after it, one row per chat) stores
    the scores and log-probs of the per-row path (Generator's default on logprobs), for
    several prompts in one call and a batch_size that splits the chats."""

    class PerRow(HFGenerator):
        label_logprobs = loop.Generator.label_logprobs

    prompts = [loop.Prompt(text=f"Sort the letters: {t}", id=i) for i, t in enumerate(["c a b", "d b"])]
    cands = [loop.Candidate(prompt=p, text=t, id=10 * p.id + k)
             for p in prompts for k, t in enumerate(["a b c", "b", "c b a, done"])]
    judge = ConstitutionalPreferenceJudge(
        ConstitutionalPreferenceJudge.Options(comparisons=3, batch_size=5), label="pref")

    def run(gen):
        res = judge.judge(make_context(tiny_policy, generator=gen, phase="judge"), cands)
        return res, [(j.candidate.id, j.score, [c["logprobs"] for c in j.meta["comparisons"]])
                     for j in res.judgments]

    batched, got = run(HFGenerator(HFGenerator.Options(batch_size=3)))
    per_row, want = run(PerRow(PerRow.Options(batch_size=4)))
    assert len(got) == 6
    for (i, s, lps), (i2, s2, lps2) in zip(got, want):
        assert i == i2 and s == pytest.approx(s2, abs=1e-6)
        assert sum(lps, []) == pytest.approx(sum(lps2, []), abs=1e-5)
    assert batched.metrics == pytest.approx(per_row.metrics, abs=1e-6)


def test_rl_cai_limits_comparisons_per_prompt(tiny_policy):
    ctx = make_context(tiny_policy, generator=HFGenerator(), phase="judge")
    prompt = loop.Prompt(text="Q", id=1)
    cands = [loop.Candidate(prompt=prompt, text=t, id=i) for i, t in enumerate("abcde")]
    res = ConstitutionalPreferenceJudge(
        ConstitutionalPreferenceJudge.Options(comparisons=3)).judge(ctx, cands)
    assert res.metrics["judge/comparisons"] == 3
    assert sum(len(j.meta["comparisons"]) for j in res.judgments) == 6
    assert all(0.0 <= j.score <= 1.0 for j in res.judgments)


# ---------------------------------------------------------------------------
# The reward-model judge
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("reward-model")
    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def test_reward_model_scores_batched_like_one_by_one(reward_model_dir):
    judge = RewardModelJudge(RewardModelJudge.Options(path=str(reward_model_dir), batch_size=3),
                             label="rm")
    ctx = make_context(phase="judge")
    judge.setup(ctx)
    p1, p2 = loop.Prompt(text="Hello?", id=1), loop.Prompt(text="Count to three.", system="Be brief.", id=2)
    cands = [loop.Candidate(prompt=p1, text="Hi.", id=1),
             loop.Candidate(prompt=p1, text="Hello there, how can I help you today?", id=2),
             loop.Candidate(prompt=p2, text="1 2 3", id=3),
             loop.Candidate(prompt=p2, text="one, two, three", id=4)]
    res = judge.judge(ctx, cands)
    batched = [j.score for j in res.judgments]
    assert [j.candidate for j in res.judgments] == cands and len(set(batched)) == 4
    # the text scored is the chat template's, system message included
    texts = judge.texts(cands)
    assert texts[2] == "<|system|>Be brief.<eos><|user|>Count to three.<eos><|assistant|>1 2 3<eos>"
    # one at a time, without padding, straight through transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reward_model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_model_dir)).eval()
    with torch.no_grad():
        single = [model(**tok(t, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
                  for t in texts]
    assert batched == pytest.approx(single, abs=1e-4)
    assert all(j.raw and j.error is None for j in res.judgments)


def test_reward_model_folder_errors(tmp_path, reward_model_dir):
    cases = {
        str(tmp_path / "missing"): "not found",
        str(tmp_path): "has no config.json",
    }
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    cases[str(tmp_path / "bin")] = "has no .safetensors weights"
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            build_component("judge", JudgeSpec(name="reward_model", path=path), "judges[2]",
                            "run.toml", source_dir=tmp_path)
        assert str(e.value).startswith("run.toml: judges[2]: reward model folder ")
        assert expected in str(e.value)
    # relative to the config file's folder
    build_component("judge", JudgeSpec(name="reward_model", path=reward_model_dir.name),
                    "judges[0]", "run.toml", source_dir=reward_model_dir.parent)


def test_reward_model_score_index_and_the_old_label_option(tmp_path, reward_model_dir):
    from loop.config import config_from_dict

    spec = JudgeSpec(name="reward_model", path=str(reward_model_dir), score_index=0, label="rm")
    assert spec.label == "rm"  # a text label still names the judge
    assert build_component("judge", spec, "judges[0]", "run.toml").options.score_index == 0
    # Setup refuses an index past the head's outputs (this head has one).
    judge = build_component("judge", JudgeSpec(name="reward_model", path=str(reward_model_dir),
                                               score_index=1), "judges[0]", "run.toml")
    with pytest.raises(loop.UserError, match="has 1 output.*`score_index` must be below that"):
        judge.setup(make_context(phase="judge"))
    # The old name: one config error that names the new one.
    data = {"name": "x", "rounds": 1, "model": {"path": str(reward_model_dir)}, "generator": {"name": "hf"},
            "prompts": [{"name": "dataset", "path": "p.jsonl"}], "selector": {"name": "pairs"},
            "updater": {"name": "dpo"},
            "judges": [{"name": "reward_model", "path": str(reward_model_dir), "label": 1}]}
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, label="run.toml")
    assert str(e.value) == ("run.toml: judges[0].label: `label` names the judge (text); the reward "
                            "model's logit index, once called `label`, is now `score_index`: "
                            "write score_index = 1")


# ---------------------------------------------------------------------------
# Judge-quality figures and the length-bias warning
# ---------------------------------------------------------------------------


def test_judge_figures_by_hand():
    p = loop.Prompt(text="q", id=1)
    short = loop.Candidate(prompt=p, text="s", num_tokens=2, id=1)
    mid = loop.Candidate(prompt=p, text="m", num_tokens=4, id=2)
    long = loop.Candidate(prompt=p, text="l", num_tokens=6, id=3)
    js = [loop.Judgment(candidate=short, score=1.0), loop.Judgment(candidate=short, score=3.0),
          loop.Judgment(candidate=mid, score=3.0), loop.Judgment(candidate=mid, score=None),
          loop.Judgment(candidate=long, score=5.0), loop.Judgment(candidate=long, score=5.0)]
    f = judge_quality.judge_figures(js, "sr")
    assert f["judge/sr/judgments"] == 6
    assert f["judge/sr/parse_failure_rate"] == pytest.approx(1 / 6)
    assert f["judge/sr/mean_score"] == pytest.approx(17 / 5)
    assert f["judge/sr/score_spread"] == pytest.approx((1.0 + 0.0) / 2)  # std of (1, 3), of (5, 5)
    # per-candidate means 2, 3, 5 against lengths 2, 4, 6
    assert f["judge/sr/length_corr"] == pytest.approx(0.9819805, abs=1e-6)
    pair = loop.Pair(prompt=p, chosen=long, rejected=short)
    s = judge_quality.selection_figures([pair], [short, mid, long], {1: 2.0, 2: 3.0, 3: 5.0})
    assert s["select/length_ratio"] == pytest.approx(3.0)
    assert s["select/length_corr"] == pytest.approx(0.9819805, abs=1e-6)
    assert judge_quality.prefixed({"judge/position_bias": 0.1, "cai/revisions": 2}, "x") == {
        "judge/x/position_bias": 0.1, "cai/revisions": 2}


def test_dashboard_warns_on_length_bias():
    from rich.console import Console

    from loop.monitor import PlainMonitor, Snapshot, render

    def shown(metrics, **kw):
        out = io.StringIO()
        Console(file=out, force_terminal=True, width=120).print(
            render(Snapshot(name="r", rounds=2, metrics={1: metrics}, **kw)))
        return out.getvalue()

    text = shown({"judge/sr/length_corr": 0.8, "select/length_ratio": 1.2})
    assert "length bias: judge/sr/length_corr = 0.80 > 0.5" in text
    assert "select/length_ratio = 1.20" not in text
    assert "length bias" not in shown({"judge/sr/length_corr": 0.8}, length_bias_threshold=0.9)
    text = shown({"select/length_ratio": 2.0}, length_ratio_threshold=1.9)
    assert "length bias: select/length_ratio = 2.00 > 1.9" in text

    class Run:
        name, rounds = "r", 1
        config = type("C", (), {"judge_quality": type("Q", (), {
            "length_bias_threshold": 0.3, "length_ratio_threshold": 1.5})()})()

    stream = io.StringIO()
    PlainMonitor(stream).round_end(run=Run(), round=1, metrics={"judge/x/length_corr": 0.4})
    assert "warning: round 1 length bias: judge/x/length_corr = 0.40 > 0.3" in stream.getvalue()


def test_cai_recipe_config_validates(tmp_path):
    from loop.runs import prepare

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Explain photosynthesis to a child."}\n')
    config, comps = prepare(str(ROOT / "configs" / "cai_recipe.toml"),
                            [f"prompts.0.path={prompts}"])
    assert [j.label for j in comps.judges] == ["constitutional", "cai_pref", "self_reward"]
    assert comps.weights == {"constitutional": 1.0, "cai_pref": 1.0, "self_reward": 0.2}
    assert config.judge_quality.length_bias_threshold == 0.3


def test_reward_model_beside_another_judge_in_a_run(tmp_path, reward_model_dir):
    """Two judges in one run: each one's scores stored under its label, combined by weight."""
    from tests.core_helpers import ro_connect, run_inprocess, write_config

    extra = (f'[[judges]]\nname = "reward_model"\nlabel = "rm"\npath = "{reward_model_dir}"\n'
             'weight = 3.0\n')
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=1, per_round=3, n=2,
                          extra=extra, top={"judge_quality": {"length_bias_threshold": -1.0}})
    run_dir = run_inprocess(config)
    conn = ro_connect(run_dir / "run.db")
    try:
        rows = conn.execute("select candidate_id, judge, score from judgments where round = 1 "
                            "and score is not null").fetchall()
        pairs = conn.execute("select * from pairs where round = 1 and selected = 1").fetchall()
        metrics = dict(conn.execute("select name, value from metrics where round = 1").fetchall())
    finally:
        conn.close()
    assert {r["judge"] for r in rows} == {"fake", "rm"}
    assert len([r for r in rows if r["judge"] == "rm"]) == 3 * 2  # one per candidate
    weights = {"fake": 1.0, "rm": 3.0}
    assert pairs
    for pair in pairs:
        per = {}
        for r in rows:
            if r["candidate_id"] == pair["chosen_id"]:
                per.setdefault(r["judge"], []).append(r["score"])
        expected = sum(weights[j] * sum(s) / len(s) for j, s in per.items()) / sum(
            weights[j] for j in per)
        assert pair["chosen_score"] == pytest.approx(expected)
    assert metrics["judge/rm/parse_failure_rate"] == 0 and "judge/fake/judgments" in metrics
    # `selfloop watch` reads the thresholds from the stored config: -1 makes any
    # score-length correlation a warning
    from loop.monitor import open_reader, snapshot_from_store

    store = open_reader(run_dir)
    try:
        snap = snapshot_from_store(store)
    finally:
        store.close()
    assert snap.length_bias_threshold == -1.0
    corr = [k for k in metrics if k.endswith("/length_corr")]
    assert corr and all(any(k in w for w in snap.warnings()) for k in corr)
