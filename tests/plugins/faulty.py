"""Components that misbehave on purpose, for the plugin-blame tests (tests/test_blame.py).

Each is named "faulty" and has a ``mode`` option choosing its fault; anything it does
not break it does plainly (so a run reaches the component under test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import loop
from loop.components import Completion


def _escape(mode: str) -> None:
    if mode == "raise":
        raise RuntimeError(f"faulty component: {mode}")
    if mode == "exit":
        sys.exit(3)
    if mode == "keyboard":
        raise KeyboardInterrupt


class FaultyGenerator(loop.Generator):
    name = "faulty"

    class Options(loop.Generator.Options):
        mode: str = "ok"  # raise | exit | keyboard | short | setup

    def setup(self, ctx):
        if self.options.mode == "setup":
            raise ValueError("faulty setup")

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        _escape(self.options.mode)
        out = [[Completion(text=f"yes {k}", num_tokens=2, finish_reason="stop")
                for k in range(sampling.n)] for _ in chats]
        return out[:-1] if self.options.mode == "short" else out


class FaultyJudge(loop.Judge):
    name = "faulty"

    class Options(loop.Judge.Options):
        mode: str = "ok"  # raise | exit | keyboard | list | metrics

    def judge(self, ctx, candidates):
        _escape(self.options.mode)
        js = [loop.Judgment(candidate=c, score=float(i % 3), raw="Score") for i, c in enumerate(candidates)]
        if self.options.mode == "list":
            return js
        if self.options.mode == "metrics":
            return loop.JudgeResult(judgments=js, metrics={"judge/x": "high"})
        return loop.JudgeResult(judgments=js)


class FaultyUpdater(loop.Updater):
    name = "faulty"

    class Options(loop.Updater.Options):
        mode: str = "ok"  # raise | exit | keyboard | dict | steps | no_adapter

    def update(self, ctx, selection, output_dir):
        mode = self.options.mode
        _escape(mode)
        if mode != "no_adapter":
            out = Path(output_dir)
            out.mkdir(parents=True)
            (out / "adapter_config.json").write_text(json.dumps({"weight": 1}))
            (out / "adapter_model.safetensors").write_bytes(b"fake")
        if mode == "dict":
            return {"loss": 0.1}
        if mode == "steps":
            return loop.UpdateResult(steps=[0.1, 0.2])
        return loop.UpdateResult()


class FaultyEvaluator(loop.Evaluator):
    name = "faulty"

    class Options(loop.Evaluator.Options):
        mode: str = "ok"  # raise | exit | text

    def evaluate(self, ctx):
        _escape(self.options.mode)
        return {"eval/x": "high"} if self.options.mode == "text" else {"eval/x": 1.0}


@loop.hookimpl
def register_generators(register):
    register(FaultyGenerator)


@loop.hookimpl
def register_judges(register):
    register(FaultyJudge)


@loop.hookimpl
def register_updaters(register):
    register(FaultyUpdater)


@loop.hookimpl
def register_evaluators(register):
    register(FaultyEvaluator)
