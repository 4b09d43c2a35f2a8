"""OPRO instruction search: the model proposes system instructions, a judge scores them.

After Large Language Models as Optimizers (Yang et al. 2023). Config::

    [[optimisers]]
    name = "opro"
    steps = 2                  # search steps per round
    proposals = 4              # instructions asked for per step (the paper's M)
    score_prompts = 8          # training prompts each instruction is scored on
    judge = { name = "self_reward", samples = 1 }   # any registered judge, with its options

The algorithm (``optimise``), once per round:

1. Sample ``score_prompts`` of the round's prompts (``ctx.rng``): every instruction of the
   round is scored on the same ones, by the same policy.
2. Step 0 scores the starting point: the ``initial`` instructions in the first round, else
   the instruction chosen in the latest earlier round (re-scored: the policy has changed);
   with ``baseline`` (the default) also no instruction at all, every round, so a searched
   instruction is deployed only when it scores above answering without one.
3. Each step 1..``steps`` renders ``prompts/opro.j2``: the ``max_history`` best scored
   instructions so far (every round's, from the ``instructions`` table and this round),
   in ascending order of score, then ``exemplars`` sampled task prompts. The optimiser
   model (the policy; or ``model``, a second local model folder loaded on its own, never
   touching the policy's weights or LoRA slot; or ``remote``, an OpenAI-compatible
   endpoint) samples ``proposals`` replies; the text between ``<INS>`` and ``</INS>`` (the
   whole reply when the tags are missing) is a proposal. Empty proposals and ones already
   scored (same text up to case and spacing) are dropped.
4. Scoring an instruction: the policy (``ctx.generator``, ``ctx.adapter``) answers each
   sampled prompt with the instruction as its system message (``answer_temperature``, 0 =
   greedy); the judge grades each answer against the prompt alone; the score is the mean
   of the parsed judge scores (None if none parsed).
5. The round's best scored instruction (ties: the earliest) is the round's system
   instruction; every scored one is stored in ``instructions``, the best with ``chosen=1``.
   With ``deploy`` (the default) it is also the system prompt the round's policy is
   deployed with: evaluators answer with it (``rounds.system``); ``deploy = false``
   evaluates the policy without it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

import loop
from loop import plugins as registry
from loop.config import ComponentSpec
from loop.templates import template_option

_INS = re.compile(r"<INS>(.*?)(?:</INS>|$)", re.DOTALL)


def parse_instruction(text: str) -> str:
    """The proposal in a reply: between <INS> and </INS> if tagged, else the whole reply."""
    m = _INS.search(text)
    return " ".join((m.group(1) if m else text).split())


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def meta_history(scored: list[tuple[str, float]], limit: int) -> list[dict[str, str]]:
    """The ``limit`` best (text, score), one per text (its latest score), worst first."""
    latest: dict[str, tuple[int, str, float]] = {}
    for order, (text, score) in enumerate(scored):
        latest[_key(text)] = (order, text, score)
    best = sorted(latest.values(), key=lambda x: (-x[2], x[0]))[:limit]
    best.sort(key=lambda x: (x[2], x[0]))
    return [{"text": text or "(no instruction)", "score": f"{score:.2f}"} for _, text, score in best]


class OPRO(loop.PromptOptimiser):
    """System-instruction search with a meta-prompt of scored past instructions."""

    name = "opro"

    class Options(loop.PromptOptimiser.Options):
        # Search steps per round (the paper runs many; each costs proposals x score_prompts answers).
        steps: int = Field(1, ge=1)
        # Instructions proposed per step (the paper's M, 8 in its experiments).
        proposals: int = Field(4, ge=1)
        # Training prompts each instruction is scored on (a sample of the round's prompts).
        score_prompts: int = Field(8, ge=1)
        # Past instructions in the meta-prompt (the paper keeps the 20 best).
        max_history: int = Field(20, ge=1)
        # Task prompts shown in the meta-prompt (the paper shows 3).
        exemplars: int = Field(3, ge=0)
        # Starting instructions of the first round; "" is no system message at all.
        initial: list[str] = [""]
        # The judge that scores answers: {name = ..., its options}; any registered judge.
        judge: dict[str, Any] = {"name": "self_reward"}
        # The optimiser model, if not the policy: a local Hugging Face model folder (loaded
        # once, on its own; safetensors only, no remote code) ...
        model: str | None = None
        # ... or an OpenAI-compatible endpoint: {url = ..., model = ..., api_key_env = ...}.
        remote: dict[str, Any] | None = None
        # Always re-score "no instruction", so a searched one must beat it to be chosen.
        baseline: bool = True
        # The chosen instruction is the deployed system prompt: evaluators use it too.
        deploy: bool = True
        # A name in prompts/ (without .j2) or a .j2 path using {history, exemplars}.
        template: template_option("history", "exemplars") = "opro"
        # Sampling of proposals (the paper samples at 1.0 for diverse instructions).
        temperature: float = Field(1.0, ge=0.0)
        max_new_tokens: int = Field(64, ge=1, description="longest proposed instruction, in tokens")
        # Sampling of the answers being scored (0 = greedy: less noise between instructions).
        answer_temperature: float = Field(0.0, ge=0.0)
        # Answer length while scoring (None: the run's generate.max_new_tokens).
        answer_max_new_tokens: int | None = Field(None, ge=1)

        @model_validator(mode="after")
        def _one_model(self):
            if self.model is not None and self.remote is not None:
                raise ValueError("give model (a local folder) or remote (an endpoint), not both")
            if self.model is not None and not Path(self.model).expanduser().is_dir():
                raise ValueError(
                    f"model: {self.model!r} is not a folder; give a local Hugging Face model "
                    "folder for the optimiser model (or remove it to use the policy)")
            return self

    def __init__(self, options=None, *, label=None):
        super().__init__(options, label=label)
        build = registry.build_component
        self.judge = build("judge", ComponentSpec(**self.options.judge), f"optimisers.{self.label}.judge",
                           label=f"{self.label}-judge")
        self._endpoint = None
        if self.options.remote is not None:
            from plugins.judges.remote import RemoteJudge

            spec = {"temperature": self.options.temperature,
                    "max_tokens": self.options.max_new_tokens, **self.options.remote}
            self._endpoint = build("judge", ComponentSpec(name="remote", **spec),
                                   f"optimisers.{self.label}.remote", label=f"{self.label}-remote")
            assert isinstance(self._endpoint, RemoteJudge)
        self._model = None  # the second local model (loop.policy.Policy), loaded on first use
        self._model_generator = None

    def setup(self, ctx) -> None:
        ctx.template(self.options.template, {"history", "exemplars"})
        self.judge.setup(ctx)

    def close(self) -> None:
        self.judge.close()
        self._model = None

    # -- the search ----------------------------------------------------------------

    def optimise(self, ctx, prompts: list[loop.Prompt]) -> loop.OptimiseResult:
        opts = self.options
        rng = ctx.rng(self.label)
        sample = rng.sample(prompts, min(opts.score_prompts, len(prompts)))
        past = ctx.store.rows(
            "select round, text, score, chosen from instructions where optimiser = ? and round < ? "
            "order by id", [self.label, ctx.round],
        )
        history = [(r["text"], r["score"]) for r in past if r["score"] is not None]
        chosen_before = [r["text"] for r in past if r["chosen"]]
        start = [chosen_before[-1]] if chosen_before else list(dict.fromkeys(opts.initial))
        if opts.baseline and "" not in start:
            start.append("")
        rows = self._score(ctx, start, sample, step=0)
        template = ctx.template(opts.template, {"history", "exemplars"})
        duplicates = 0
        for step in range(1, opts.steps + 1):
            scored = history + [(i.text, i.score) for i in rows if i.score is not None]
            exemplars = [p.text for p in rng.sample(prompts, min(opts.exemplars, len(prompts)))]
            meta = template.render(history=meta_history(scored, opts.max_history), exemplars=exemplars)
            seen = {_key(t) for t, _ in history} | {_key(i.text) for i in rows}
            proposals, raws = [], []
            for reply in self._propose(ctx, meta, step):
                text = parse_instruction(reply)
                if not text or _key(text) in seen:
                    duplicates += 1
                    continue
                seen.add(_key(text))
                proposals.append(text)
                raws.append(reply)
            new = self._score(ctx, proposals, sample, step=step)
            for ins, raw in zip(new, raws):
                ins.meta["raw"] = raw
            rows.extend(new)
            ctx.progress(step, opts.steps)
        valid = [i for i in rows if i.score is not None]
        best = max(valid, key=lambda i: i.score) if valid else rows[0]  # max keeps the first of ties
        best.chosen = True
        metrics = {
            "opro/proposed": float(sum(i.step > 0 for i in rows)),
            "opro/duplicates": float(duplicates),
        }
        if valid:
            metrics["opro/best_score"] = best.score
            metrics["opro/mean_score"] = sum(i.score for i in valid) / len(valid)
        metrics["opro/instruction_chosen"] = float(bool(best.text))
        return loop.OptimiseResult(prompts=prompts, system=best.text or None, instructions=rows,
                                   metrics=metrics, deploy=opts.deploy)

    def _propose(self, ctx, meta_prompt: str, step: int) -> list[str]:
        seed = ctx.derive_seed(self.label, "propose", step)
        if self._endpoint is not None:
            replies = [self._endpoint.request(meta_prompt, seed + k) for k in range(self.options.proposals)]
            failed = [r.error for r in replies if r.text is None]
            if failed:
                ctx.event(f"opro: {len(failed)} of {len(replies)} optimiser requests failed "
                          f"({failed[0]})", level="warning")
            return [r.text for r in replies if r.text is not None]
        sampling = loop.Sampling(n=self.options.proposals, temperature=self.options.temperature,
                                 max_new_tokens=self.options.max_new_tokens, seed=seed)
        chat = [[{"role": "user", "content": meta_prompt}]]
        if self.options.model is not None:
            gen, own = self._second_model(ctx)
            out = gen.generate(own, chat, sampling, adapter=None, progress=False)
        else:
            out = ctx.generator.generate(ctx, chat, sampling, adapter=ctx.adapter, progress=False)
        return [c.text for c in out[0]]

    def _second_model(self, ctx):
        """The optimiser model folder as its own ``Policy`` (its own weights, tokenizer and
        LoRA slot: the run's policy is never touched), with a transformers generator and a
        copy of ``ctx`` whose ``policy()`` is that model."""
        if self._model is None:
            from loop.policy import Policy
            from plugins.generators.hf import HFGenerator

            m = ctx.config.model
            self._model = Policy(str(Path(self.options.model).expanduser().resolve()),
                                 device=m.device, dtype=m.dtype, trust_remote_code=False,
                                 threads=m.threads)
            self._model_generator = HFGenerator()
        own = dataclasses.replace(ctx, _policy_factory=lambda: self._model, adapter=None)
        return self._model_generator, own

    def _score(self, ctx, texts: list[str], sample: list[loop.Prompt], *, step: int):
        """One ``loop.Instruction`` per text: the mean judge score of the policy's answers."""
        if not texts:
            return []
        opts = self.options
        chats, owners = [], []
        for i, text in enumerate(texts):
            for p in sample:
                system = [{"role": "system", "content": text}] if text else []
                chats.append(system + [{"role": "user", "content": p.text}])
                owners.append((i, p))
        max_new = opts.answer_max_new_tokens or ctx.config.generate.max_new_tokens
        sampling = loop.Sampling(n=1, temperature=opts.answer_temperature, max_new_tokens=max_new,
                                 seed=ctx.derive_seed(self.label, "answer", step))
        answers = ctx.generator.generate(ctx, chats, sampling, adapter=ctx.adapter, progress=False)
        cands = [loop.Candidate(prompt=loop.Prompt(text=p.text), text=a[0].text, policy=ctx.policy_label,
                                meta={"instruction": i})
                 for (i, p), a in zip(owners, answers)]
        result = self.judge.judge(ctx, cands)
        scores: list[list[float]] = [[] for _ in texts]
        for j in result.judgments:
            if j.score is not None:
                scores[j.candidate.meta["instruction"]].append(j.score)
        return [
            loop.Instruction(text=text, score=sum(s) / len(s) if s else None, step=step,
                             scored_on=len(s), meta={"prompt_ids": [p.id for p in sample]})
            for text, s in zip(texts, scores)
        ]


@loop.hookimpl
def register_prompt_optimisers(register):
    register(OPRO)
