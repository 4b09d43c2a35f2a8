"""tinyworld: the task, its verifier, the tokenizer, the seed model builder and the plugin.

Offline and on CPU: the model tests use ``TEST_RECIPE`` (a few seconds per build).
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pluggy
import pytest
import torch

import loop
from loop import hookspecs
from loop.context import Context
from plugins import tinyworld
from plugins.tinyworld import model as tw_model
from plugins.tinyworld import task
from plugins.tinyworld.experiment import dpo_loss, parse_score
from plugins.tinyworld.tokenizer import build_tokenizer

torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU


# -- task and verifier -------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("a b c d", True),
        ("  a b c d \n", True),  # surrounding whitespace is ignored
        ("a b d c", False),  # last two swapped
        ("Answer: a b c d", False),  # the seed model's habit: a chatty prefix
        ("a b c", False),  # a letter missing
        ("a b c d d", False),  # a letter repeated
        ("a b c e", False),  # a letter replaced
        ("a, b, c, d", False),  # malformed: punctuation
        ("The answer is a b c d", False),  # malformed: extra words
        ("abcd", False),  # malformed: no spaces
        ("", False),
    ],
)
def test_verify(answer, ok):
    assert task.verify("Sort the letters: d b a c", answer) is ok


def test_verify_refuses_foreign_prompts():
    assert not task.verify("Reverse the letters: d b a c", "a b c d")
    assert task.parse_prompt("Sort the letters: d b a c").letters == ("d", "b", "a", "c")


def test_rubric_grades_partial_answers():
    prompt = "Sort the letters: d b a c"
    assert task.rubric_score(prompt, "a b c d") == 5
    assert task.rubric_score(prompt, "a b d c") == 3  # form, length, letters
    assert task.rubric_score(prompt, "a b c") == 2  # form, order
    assert task.rubric_score(prompt, "a b c e") == 3  # form, length, order
    assert task.rubric_score(prompt, "hello") == 0
    info = task.parse_prompt(prompt)
    assert task.habit_answer(info) == "Answer: a b c d"
    assert task.rubric_score(prompt, task.habit_answer(info)) == 0  # breaks the form check
    assert not task.verify(prompt, task.habit_answer(info))


def test_judgment_text_ends_with_a_parseable_score():
    prompt = "Sort the letters: d b a c"
    for answer, score in [("a b c d", 5), ("a b d c", 3), ("x", 0)]:
        text = task.judgment_text(prompt, answer)
        assert text.splitlines()[-1] == f"Score: {score}"
        assert parse_score(text) == score
    assert parse_score("Score: 7") is None  # out of range
    assert parse_score("Form ok.\nScore: 4.5") == 4.5
    assert parse_score("no score here") is None


def test_corruptions_are_wrong_or_imperfect():
    rng = random.Random(0)
    for _ in range(300):
        text, info = task.make_prompt(rng)
        assert task.rubric_score(text, task.corrupt_answer(rng, info)) < 5


def test_heldout_split_is_disjoint_from_train_prompts():
    heldout = {text for text, _ in task.heldout_set(200)}
    assert len(heldout) == 200
    assert all(task.split_of(task.parse_prompt(t).letters) == "heldout" for t in heldout)
    rng = random.Random(1)
    train = {task.make_prompt(rng, "train")[0] for _ in range(3000)}
    assert not heldout & train
    assert task.heldout_set(50) == task.heldout_set(50)  # fixed across rounds


# -- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_round_trips_and_formats_chats():
    tok = build_tokenizer()
    text = task.judgment_text("Sort the letters: d b a c", "a b d c")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    chat = [{"role": "user", "content": "Sort the letters: d b a"}]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s><|user|>\nSort the letters: d b a<|end|><|assistant|>\n"
    plain = tok.apply_chat_template(chat, tokenize=False)
    assert not plain.endswith("<|assistant|>\n")
    answer = tok("a b d", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(answer, skip_special_tokens=True) == "a b d"


def test_seed_data_trains_on_the_assistant_turn_only():
    tok = build_tokenizer()
    ids, labels = tw_model.encode_chat(tok, "Sort the letters: d b a", "a b d")
    target = [t for t in labels if t != -100]
    assert tok.decode(target) == "a b d" + tok.eos_token
    assert ids[-len(target):] == target and len(ids) == len(labels)


def test_judge_template_renders_prompt_and_response():
    text = tw_model.judge_prompt("Sort the letters: d b a", "a b d")
    assert "Sort the letters: d b a" in text
    assert "<answer>\na b d\n</answer>" in text


# -- seed model builder -----------------------------------------------------------------


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_build_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The reduced recipe builds in about a second; the full recipe's build time is measured
    # by bench/demo.py (cold cache), not asserted here.
    path = tw_model.build(tmp_path, tw_model.TEST_RECIPE)
    assert Path(path).name == f"tinyworld-{tw_model.TEST_RECIPE.key()}"
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]  # no temp leftovers
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert tok.chat_template
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Sort the letters: c a b"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    first = tw_model.build(tmp_path / "a", tw_model.TEST_RECIPE)
    second = tw_model.build(tmp_path / "b", tw_model.TEST_RECIPE)
    wa, wb = _weights(first), _weights(second)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    other = tw_model.TEST_RECIPE.model_copy(update={"seed": 1})
    assert other.key() != tw_model.TEST_RECIPE.key()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(tw_model, "train_seed", no_training)
    assert tw_model.build(tmp_path / "a", tw_model.TEST_RECIPE) == first
    with pytest.raises(AssertionError):
        tw_model.build(tmp_path / "a", other)


# -- plugin components -------------------------------------------------------------------


def _ctx(round_=1, phase="propose", **kw) -> Context:
    return Context(config=SimpleNamespace(seed=7), run_dir=Path("."), round=round_,
                   phase=phase, adapter=None, policy_label="base", store=kw.pop("store", None),
                   **kw)


def test_plugin_registers_the_three_components():
    pm = pluggy.PluginManager("selfloop")
    pm.add_hookspecs(hookspecs)
    pm.register(tinyworld)
    found = {}
    for hook in ("register_model_builders", "register_prompt_sources", "register_evaluators"):
        getattr(pm.hook, hook)(register=lambda cls: found.setdefault(cls.kind, cls))
    assert {k: c.name for k, c in found.items()} == {
        "model_builder": "tinyworld", "prompt_source": "tinyworld", "evaluator": "tinyworld"}
    assert found["model_builder"].Options(steps=5).steps == 5
    with pytest.raises(ValueError):
        found["model_builder"].Options(nonsense=1)
    with pytest.raises(ValueError, match="multiple of heads"):
        found["model_builder"].Options(hidden_size=30, heads=4)


def test_prompt_source_is_deterministic_and_draws_train_prompts():
    source = tinyworld.TinyworldPrompts(tinyworld.TinyworldPrompts.Options(per_round=40))
    a = source.propose(_ctx())
    b = source.propose(_ctx())
    c = source.propose(_ctx(round_=2))
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in a] != [p.text for p in c]
    assert len(a) == 40 and all(isinstance(p, loop.Prompt) and p.source == "tinyworld" for p in a)
    assert all(task.split_of(task.parse_prompt(p.text).letters) == "train" for p in a)


class _FakeGenerator:
    """Answers right for every other prompt, with the habit otherwise."""

    def __init__(self):
        self.calls = []

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        self.calls.append((sampling, adapter))
        out = []
        for i, chat in enumerate(chats):
            info = task.parse_prompt(chat[-1]["content"])
            text = info.answer if i % 2 == 0 else task.habit_answer(info)
            out.append([loop.Completion(text=text, num_tokens=len(info.letters) + 1,
                                        finish_reason="stop")])
        return out


class _FakeStore:
    def prompts(self, round):
        return [{"id": 1, "text": "Sort the letters: d b a c"}]

    def candidates(self, round):
        return [{"id": 10, "prompt_id": 1, "text": "a b c d"},
                {"id": 11, "prompt_id": 1, "text": "a b d c"}]

    def judgments(self, round):
        return [
            {"candidate_id": 10, "judge": "self", "score": 5.0, "raw": "Score: 5"},  # agrees
            {"candidate_id": 11, "judge": "self", "score": 3.0, "raw": "Score: 3"},  # agrees
            {"candidate_id": 11, "judge": "self", "score": 5.0, "raw": "Score: 5"},  # disagrees
            {"candidate_id": 11, "judge": "self", "score": None, "raw": "?"},  # parse failure
        ]


def test_evaluator_measures_accuracy_length_and_agreement():
    gen = _FakeGenerator()
    evaluator = tinyworld.TinyworldEvaluator(tinyworld.TinyworldEvaluator.Options(heldout=20))
    metrics = evaluator.evaluate(_ctx(phase="evaluate", generator=gen, store=_FakeStore()))
    assert metrics["eval/accuracy"] == pytest.approx(0.5)
    assert metrics["eval/habit_rate"] == pytest.approx(0.5)
    assert metrics["eval/mean_length"] > 3
    assert metrics["judge/verifier_agreement"] == pytest.approx(2 / 3)
    assert metrics["judge/verified_judgments"] == 3
    sampling, adapter = gen.calls[0]
    assert sampling.temperature == 0.0 and sampling.n == 1 and adapter is None
    # Round 0 has no judgments; a broken store never fails the evaluation.
    assert "judge/verifier_agreement" not in evaluator.evaluate(
        _ctx(round_=0, phase="evaluate", generator=gen, store=_FakeStore()))
    broken = _ctx(phase="evaluate", generator=gen, store=object())
    assert "judge/verifier_agreement" not in evaluator.evaluate(broken)


def test_dpo_loss_matches_hand_computed_value():
    # margin = (1 - 0) - (0 - 1) = 2; beta 0.5 -> -log sigmoid(1) = 0.31326
    loss = dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                    torch.tensor([1.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.313262, abs=1e-5)
