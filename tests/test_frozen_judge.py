"""`adapter = "policy" | "base"` on every judge that runs the policy's model: "base" grades
with the starting weights (adapter None) whatever the round, in calls of its own (on vLLM a
call never mixes base and LoRA rows: docs/vllm.md)."""

from __future__ import annotations

import pytest

import loop
from loop import plugins
from loop.config import ComponentSpec
from tests.conftest import make_context


class Recording(loop.Generator):
    name = "recording"

    def __init__(self):
        super().__init__()
        self.calls = []

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        self.calls.append(("generate", adapter, len(chats)))
        return [[loop.Completion(text="Looks fine.\nScore: 4", num_tokens=5, finish_reason="stop")
                 for _ in range(sampling.n)] for _ in chats]

    def logprobs(self, ctx, chats, responses, *, adapter):
        self.calls.append(("logprobs", adapter, len(chats)))
        return [-1.0 for _ in chats]


def _candidates():
    p = loop.Prompt(text="Sort the letters: b a")
    return [loop.Candidate(prompt=p, text="a b"), loop.Candidate(prompt=p, text="b a")]


@pytest.mark.parametrize("name, extra", [
    ("self_reward", {"samples": 1}),
    ("constitutional", {"per_prompt": 1}),
    ("constitutional_preference", {"comparisons": 1}),
])
@pytest.mark.parametrize("adapter, expected", [("policy", "runs/x/adapters/round-1"), ("base", None)])
def test_model_judges_grade_with_the_chosen_weights(name, extra, adapter, expected, tmp_path):
    judge = plugins.build_component("judge", ComponentSpec(name=name, adapter=adapter, **extra), "judges[0]")
    gen = Recording()
    ctx = make_context(generator=gen, adapter="runs/x/adapters/round-1", round=2, phase="judge")
    judge.setup(ctx)
    result = judge.judge(ctx, _candidates())
    assert gen.calls and all(a == expected for _, a, _ in gen.calls)
    if name != "constitutional_preference":  # it reads log-probs: writes no text
        assert result.outputs > 0 and result.truncated == 0


def test_adapter_option_is_validated():
    with pytest.raises(loop.ConfigError, match="judges\\[0\\].adapter"):
        plugins.build_component("judge", ComponentSpec(name="self_reward", adapter="frozen"), "judges[0]")
