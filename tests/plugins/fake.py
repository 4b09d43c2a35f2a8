"""Small, deterministic, model-free components for testing the core protocol.

Registered as a real plugin (``--plugin tests/plugins/fake.py`` or ``plugins = [...]``).
Options let a test slow a phase down (to kill it there) or make a component fail.
Environment: ``FAKE_KILL_ON_SQL="<substring>:<n>"`` SIGKILLs this process when the
n-th SQL statement containing <substring> runs (to kill it inside a commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import loop
from loop.components import Completion


def _h(*parts) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _adapter_key(adapter) -> str | None:
    if not adapter:
        return None
    return (Path(adapter) / "adapter_config.json").read_text()


class FakeBuilder(loop.ModelBuilder):
    name = "fake"

    def build(self, cache_dir):
        d = Path(cache_dir) / "fake-model"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text("{}")
        return str(d)


class FakeGenerator(loop.Generator):
    name = "fake"

    class Options(loop.Generator.Options):
        sleep: float = 0.0  # seconds per prompt, to leave time to kill the process
        fail: bool = False

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        if self.options.fail:
            raise RuntimeError("the fake generator was told to fail")
        out = []
        for i, chat in enumerate(chats):
            # Seeded by the adapter's content, not its path: two runs in different folders
            # with the same history sample the same texts (the kill/resume tests compare them).
            rng = random.Random(_h(sampling.seed, chat[-1]["content"], _adapter_key(adapter)))
            samples = []
            for k in range(sampling.n):
                words = rng.randint(1, 6)
                text = " ".join(rng.choice(["yes", "no", "maybe"]) for _ in range(words))
                samples.append(Completion(text=text, num_tokens=words, finish_reason="stop",
                                          logprob_sum=-float(words)))
            out.append(samples)
            if progress:
                ctx.progress(i + 1, len(chats))
            time.sleep(self.options.sleep)
        return out


class FakePrompts(loop.PromptSource):
    name = "fake"

    class Options(loop.PromptSource.Options):
        per_round: int = 4

    def propose(self, ctx):
        rng = ctx.rng()
        return [loop.Prompt(text=f"question {ctx.round}.{i} {rng.randint(0, 999)}")
                for i in range(self.options.per_round)]


class FakeJudge(loop.Judge):
    name = "fake"

    class Options(loop.Judge.Options):
        samples: int = 2
        sleep: float = 0.0
        fail_every: int = 7  # every n-th judgment is an unparseable one

    def judge(self, ctx, candidates):
        out = []
        for i, c in enumerate(candidates):
            for k in range(self.options.samples):
                n = _h(ctx.seed, c.text, c.prompt.text, k)
                if n % self.options.fail_every == 0:
                    out.append(loop.Judgment(candidate=c, score=None, raw="garbage", sample_index=k,
                                             error="unparseable"))
                else:
                    score = float(c.text.count("yes") + n % 2)
                    out.append(loop.Judgment(candidate=c, score=score, raw=f"Score: {score}",
                                             sample_index=k))
            ctx.progress(i + 1, len(candidates))
            time.sleep(self.options.sleep)
        return loop.JudgeResult(judgments=out)


class FakeSelector(loop.Selector):
    name = "fake_pairs"

    def select(self, ctx, candidates, scores, offered):
        by_prompt = {}
        for c in candidates:
            if c.id in scores:
                by_prompt.setdefault(c.prompt.id, []).append(c)
        pairs = []
        for pid, cs in sorted(by_prompt.items()):
            cs.sort(key=lambda c: (scores[c.id], -c.id))
            lo, hi = cs[0], cs[-1]
            if scores[hi.id] > scores[lo.id]:
                pairs.append(loop.Pair(prompt=hi.prompt, chosen=hi, rejected=lo,
                                       chosen_score=scores[hi.id], rejected_score=scores[lo.id]))
        return loop.Selection(pairs=pairs)


class FakeUpdater(loop.Updater):
    name = "fake"

    class Options(loop.Updater.Options):
        steps: int = 3
        sleep: float = 0.0  # seconds per step

    def update(self, ctx, selection, output_dir):
        out = Path(output_dir)
        out.mkdir(parents=True)
        prev = {}
        if ctx.adapter:
            prev = json.loads((Path(ctx.adapter) / "adapter_config.json").read_text())
        weight = prev.get("weight", 0) + len(selection.pairs)
        steps = []
        for s in range(self.options.steps):
            time.sleep(self.options.sleep)
            loss = 1.0 / (1 + s + weight)
            steps.append(loop.TrainStep(step=s, loss=loss, learning_rate=1e-3,
                                        metrics={"rewards/margin": weight * 0.01 + s}))
            ctx.progress(s + 1, self.options.steps, loss=loss)
        (out / "adapter_config.json").write_text(json.dumps({"weight": weight}))
        (out / "adapter_model.safetensors").write_bytes(b"fake")
        return loop.UpdateResult(steps=steps, metrics={"rewards/margin": weight * 0.01})


class FakeEvaluator(loop.Evaluator):
    name = "fake"

    def evaluate(self, ctx):
        weight = 0
        if ctx.adapter:
            weight = json.loads((Path(ctx.adapter) / "adapter_config.json").read_text())["weight"]
        return {"eval/accuracy": min(1.0, weight / 100), "eval/round": float(ctx.round)}


@loop.hookimpl
def register_model_builders(register):
    register(FakeBuilder)


@loop.hookimpl
def register_generators(register):
    register(FakeGenerator)


@loop.hookimpl
def register_prompt_sources(register):
    register(FakePrompts)


@loop.hookimpl
def register_judges(register):
    register(FakeJudge)


@loop.hookimpl
def register_selectors(register):
    register(FakeSelector)


@loop.hookimpl
def register_updaters(register):
    register(FakeUpdater)


@loop.hookimpl
def register_evaluators(register):
    register(FakeEvaluator)


@loop.hookimpl
def run_start(run):
    spec = os.environ.get("FAKE_KILL_ON_SQL")
    if not spec:
        return
    needle, _, n = spec.rpartition(":")
    seen = [0]

    def trace(sql):
        if needle.lower() in sql.lower():
            seen[0] += 1
            if seen[0] >= int(n):
                os.kill(os.getpid(), signal.SIGKILL)

    run.store.conn.set_trace_callback(trace)
