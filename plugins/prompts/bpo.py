"""BPO prompt rewriting inside the loop: a LoRA rewriter learnt from the loop's own pairs.

After Black-Box Prompt Optimization (Cheng et al. 2023). Config::

    [[optimisers]]
    name = "bpo"
    keep_original = true     # answer both the original and the rewrite (for bpo/score_delta)
    train = { max_steps = 20, lora_r = 8 }

    [[evaluators]]
    name = "bpo"             # bpo/score_delta: answers to rewrites vs to their originals

The algorithm (``optimise``), in round r:

1. Data: for each preference pair of round r-1 (``pairs.selected = 1``, at most
   ``max_pairs``, sampled with ``ctx.rng``), the policy reads the prompt with its chosen
   and rejected answers (``prompts/bpo_improve.j2``) and writes an improved prompt.
   Empty ones and ones equal to the original are dropped. Each kept one is stored as a
   prompt of round r with ``kind="rewrite"``, ``parent`` = the pair's prompt and
   ``meta = {"bpo": "train", "pair_id": ...}``; it is training data, never answered.
2. Training: every (original -> improved) example this optimiser stored in rounds <= r
   trains a fresh rewriter LoRA adapter on the same base (``train_sft``), rendered as
   ``prompts/bpo_rewriter.j2``(original) -> improved. It is saved atomically as the PEFT
   folder ``<run_dir>/adapters/bpo-round-<r>/``. With fewer than ``min_examples``
   examples (round 1 has no pairs yet) there is no rewriter and prompts pass unchanged.
3. Rewriting: the generator rewrites each incoming prompt with ``adapter`` = the rewriter
   folder (greedy). A non-empty rewrite that differs from its original becomes a prompt
   with ``kind="rewrite"``, ``parent`` = the original and ``meta = {"bpo": "rewrite"}``.
4. The gate (``gate = true``, the default): a rewrite is used only where it is better.
   The policy answers a ``validation_prompts`` sample of the rewritten prompts and their
   rewrites (``answers`` each, the run's sampling); the run's judges score every answer
   against the *original* prompt (``ctx.score``: the user's request is what an answer
   must serve), combined as ``[selection] combine`` does. The rewriter is adopted for the
   round only if the rewrites' mean score beats the originals' by more than
   ``accept_threshold``; then every other rewritten prompt is answered and scored the
   same way, and each rewrite is kept only where its answers scored higher than its
   original's. A kept rewrite replaces the original in the round, or joins it (original
   first) with ``keep_original``. Originals and rewrites are always stored, with one row
   per rewrite in ``rewrite_decisions`` (both scores, kept or not, why).

Metrics: ``bpo/rewrite_rate`` (rewritten / incoming prompts), ``bpo/accepted_rate`` (kept /
rewritten), ``bpo/adopted`` (1: the rewriter passed validation), ``bpo/validation_delta``
(mean rewrite - original score on the validation sample), ``bpo/train_examples``,
``bpo/new_examples``; the ``bpo`` evaluator adds ``bpo/score_delta`` (see its docstring).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field

import loop
from loop.policy import install_adapter
from loop.templates import template_option
from plugins.updaters.sft import SFTOptions, train_sft


def _key(text: str) -> str:
    return " ".join(text.lower().split())


class BPO(loop.PromptOptimiser):
    """Rewrite prompts with a rewriter adapter trained on the loop's preference pairs."""

    name = "bpo"

    class Options(loop.PromptOptimiser.Options):
        # Answer the original as well as its rewrite (needed for bpo/score_delta).
        keep_original: bool = False
        # Pairs of the previous round turned into training data per round.
        max_pairs: int = Field(64, ge=1)
        # Fewest (original -> improved) examples to train a rewriter on.
        min_examples: int = Field(1, ge=1)
        # Templates: writing an improved prompt from a pair, and the rewriter's input.
        template: template_option("prompt", "chosen", "rejected") = "bpo_improve"
        rewriter_template: template_option("prompt") = Field("bpo_rewriter", description=(
            "the rewriter's input: a name in prompts/ (without .j2) or a .j2 path using {prompt}"))
        # Sampling while writing improved prompts from pairs.
        temperature: float = Field(0.7, ge=0.0)
        max_new_tokens: int = Field(128, ge=1, description="longest improved prompt written from a pair")
        # Length of a rewrite (the rewriter decodes greedily).
        rewrite_max_new_tokens: int = Field(128, ge=1)
        # How the rewriter adapter is trained (plugins/updaters/sft.py).
        train: SFTOptions = SFTOptions()
        # Use a rewrite only where its answers score better than the original's (see 4.);
        # false: every rewrite is used, unchecked (the old behaviour).
        gate: bool = True
        # Rewritten prompts in the validation sample that decides the rewriter's adoption.
        validation_prompts: int = Field(16, ge=1)
        # Answers per prompt and side while gating (more: less noise, more cost).
        answers: int = Field(2, ge=1)
        # Adopt the rewriter only if rewrites beat originals by more than this (mean score).
        accept_threshold: float = 0.0

    def setup(self, ctx) -> None:
        self._templates(ctx)

    def _templates(self, ctx):
        return (ctx.template(self.options.template, {"prompt", "chosen", "rejected"}),
                ctx.template(self.options.rewriter_template, {"prompt"}))

    def optimise(self, ctx, prompts: list[loop.Prompt]) -> loop.OptimiseResult:
        improve, rewriter_input = self._templates(ctx)
        new = self._training_data(ctx, improve)
        examples = [(r["original"], r["improved"]) for r in ctx.store.rows(
            "select o.text as original, t.text as improved from prompts t "
            "join prompts o on o.id = t.parent_id where t.source = ? and t.round < ? "
            "and json_extract(t.meta, '$.bpo') = 'train' order by t.id", [self.label, ctx.round])]
        examples += [(p.parent.text, p.text) for p in new]
        metrics = {"bpo/train_examples": float(len(examples)), "bpo/new_examples": float(len(new)),
                   "bpo/rewrite_rate": 0.0}
        if len(examples) < self.options.min_examples:
            return loop.OptimiseResult(prompts=prompts, new_prompts=new, metrics=metrics)
        chats = [[{"role": "user", "content": rewriter_input.render(prompt=o)}] for o, _ in examples]
        adapter = self._train(ctx, list(zip(chats, [i for _, i in examples])))
        rewrites = self._rewrite(ctx, prompts, rewriter_input, adapter)
        metrics["bpo/rewrite_rate"] = len(rewrites) / max(len(prompts), 1)
        decisions = self._gate(ctx, rewrites, metrics) if self.options.gate else [
            loop.RewriteDecision(prompt=p, rewrite=rw, original_score=None, rewrite_score=None,
                                 kept=True, reason="ungated") for p, rw in rewrites.items()]
        kept = {id(d.prompt): d.rewrite for d in decisions if d.kept}
        metrics["bpo/accepted_rate"] = len(kept) / max(len(rewrites), 1)
        out = []
        for p in prompts:
            rw = kept.get(id(p))
            out.extend([p] if rw is None else [p, rw] if self.options.keep_original else [rw])
        return loop.OptimiseResult(prompts=out, new_prompts=new, metrics=metrics,
                                   decisions=decisions)

    def _gate(self, ctx, rewrites: dict, metrics: dict) -> list[loop.RewriteDecision]:
        """Step 4: validation sample, then per-prompt fallback; one decision per rewrite."""
        opts = self.options
        order = list(rewrites)
        sample = ctx.rng(self.label, "validate").sample(order, min(opts.validation_prompts, len(order)))
        scored = self._side_scores(ctx, [(p, rewrites[p]) for p in sample])
        deltas = [r - o for o, r in scored.values() if o is not None and r is not None]
        delta = sum(deltas) / len(deltas) if deltas else None
        adopted = delta is not None and delta > opts.accept_threshold
        metrics["bpo/adopted"] = float(adopted)
        if delta is not None:
            metrics["bpo/validation_delta"] = delta
        if adopted:
            rest = [p for p in order if p not in scored]
            scored.update(self._side_scores(ctx, [(p, rewrites[p]) for p in rest]))
        in_sample = set(sample)
        out = []
        for p in order:
            o, r = scored.get(p, (None, None))
            if not adopted:
                kept, reason = False, "rewriter rejected"
            elif o is None or r is None:
                kept, reason = False, "unscored"
            else:
                kept, reason = r > o, ("better" if r > o else "not better")
            out.append(loop.RewriteDecision(prompt=p, rewrite=rewrites[p], original_score=o,
                                            rewrite_score=r, kept=kept, reason=reason,
                                            validation=p in in_sample))
        ctx.event(f"bpo: rewriter {'adopted' if adopted else 'rejected'} (validation delta "
                  f"{'-' if delta is None else f'{delta:+.3f}'} over {len(deltas)} prompts); "
                  f"{sum(d.kept for d in out)} of {len(out)} rewrites kept")
        return out

    def _side_scores(self, ctx, items) -> dict:
        """Per original prompt: (mean score of answers to it, mean score of answers to its
        rewrite), every answer judged against the original prompt."""
        if not items:
            return {}
        g = ctx.config.generate
        chats = [ctx.chat(text) for p, rw in items for text in (p.text, rw.text)]
        sampling = loop.Sampling(n=self.options.answers, temperature=g.temperature, top_p=g.top_p,
                                 max_new_tokens=g.max_new_tokens,
                                 seed=ctx.derive_seed(self.label, "gate", len(items)))
        outs = ctx.generator.generate(ctx, chats, sampling, adapter=ctx.adapter, progress=False)
        cands, owner = [], []
        for k, (p, _) in enumerate(items):
            judged_as = loop.Prompt(text=p.text, source=p.source, meta=p.meta)
            for side in (0, 1):
                for a in outs[2 * k + side]:
                    cands.append(loop.Candidate(prompt=judged_as, text=a.text, policy=ctx.policy_label,
                                                num_tokens=a.num_tokens, finish_reason=a.finish_reason,
                                                meta={"bpo_side": side}))
                    owner.append((k, side))
        per: dict = {}
        for (k, side), score in zip(owner, ctx.score(cands)):
            if score is not None:
                per.setdefault((k, side), []).append(score)

        def mean(k, side):
            xs = per.get((k, side))
            return sum(xs) / len(xs) if xs else None

        return {p: (mean(k, 0), mean(k, 1)) for k, (p, _) in enumerate(items)}

    def _training_data(self, ctx, improve) -> list[loop.Prompt]:
        """Step 1: improved prompts written from the previous round's preference pairs."""
        rows = ctx.store.rows(
            "select p.id, p.prompt_id, pr.text as prompt, pr.round as prompt_round, "
            "ch.text as chosen, rj.text as rejected from pairs p "
            "join prompts pr on pr.id = p.prompt_id join candidates ch on ch.id = p.chosen_id "
            "join candidates rj on rj.id = p.rejected_id "
            "where p.round = ? and p.selected = 1 order by p.id", [ctx.round - 1])
        if len(rows) > self.options.max_pairs:
            rows = sorted(ctx.rng(self.label, "pairs").sample(rows, self.options.max_pairs),
                          key=lambda r: r["id"])
        if not rows:
            return []
        chats = [[{"role": "user", "content": improve.render(
            prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"])}] for r in rows]
        sampling = loop.Sampling(n=1, temperature=self.options.temperature,
                                 max_new_tokens=self.options.max_new_tokens,
                                 seed=ctx.derive_seed(self.label, "improve"))
        outs = ctx.generator.generate(ctx, chats, sampling, adapter=ctx.adapter, progress=False)
        new = []
        for r, out in zip(rows, outs):
            text = out[0].text.strip()
            if not text or _key(text) == _key(r["prompt"]):
                continue
            parent = loop.Prompt(text=r["prompt"], id=r["prompt_id"], round=r["prompt_round"])
            new.append(loop.Prompt(text=text, source=self.label, kind="rewrite", parent=parent,
                                   meta={"bpo": "train", "pair_id": r["id"]}))
        return new

    def _train(self, ctx, examples) -> str:
        """Step 2: a fresh rewriter adapter, installed atomically; returns its folder."""
        adapters = Path(ctx.run_dir) / "adapters"
        adapters.mkdir(parents=True, exist_ok=True)
        final = adapters / f"bpo-round-{ctx.round}"
        tmp = adapters / f".bpo-round-{ctx.round}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a killed attempt
        gen = ctx.generator
        gen.release(ctx)
        try:
            train_sft(ctx.policy(), examples, self.options.train, ctx.derive_seed(self.label, "sft"),
                      str(tmp), progress=lambda d, t, loss: ctx.progress(d, t, loss=loss))
        finally:
            gen.reclaim(ctx)
        install_adapter(str(tmp), str(final))
        return str(final)

    def _rewrite(self, ctx, prompts, rewriter_input, adapter: str) -> dict:
        """Step 3: rewrite every incoming prompt with the rewriter adapter; {original: rewrite}
        for the ones that changed."""
        chats = [[{"role": "user", "content": rewriter_input.render(prompt=p.text)}] for p in prompts]
        sampling = loop.Sampling(n=1, temperature=0.0,
                                 max_new_tokens=self.options.rewrite_max_new_tokens,
                                 seed=ctx.derive_seed(self.label, "rewrite"))
        outs = ctx.generator.generate(ctx, chats, sampling, adapter=adapter, progress=False)
        rel = str(Path(adapter).relative_to(Path(ctx.run_dir))) if Path(adapter).is_relative_to(
            Path(ctx.run_dir)) else adapter
        rewrites = {}
        for p, out in zip(prompts, outs):
            text = out[0].text.strip()
            if text and _key(text) != _key(p.text):
                rewrites[p] = loop.Prompt(text=text, source=self.label, system=p.system,
                                          kind="rewrite", parent=p,
                                          meta={"bpo": "rewrite", "adapter": rel})
        return rewrites


class BPOEvaluator(loop.Evaluator):
    """``bpo/score_delta``: how much better the answers to rewrites scored than to originals.

    Over this round's answered prompts: for every BPO rewrite answered together with its
    original (``keep_original = true``), each prompt's score is the mean over its sampled
    candidates (``source = 'policy'``) of the candidate's mean parsed judge score (every
    judge's samples pooled, unweighted); the delta is rewrite minus original, and
    ``bpo/score_delta`` is its mean over the pairs where both sides have a score
    (``bpo/compared`` counts them). Without ``keep_original`` nothing is compared and the
    figures are absent.
    """

    name = "bpo"

    class Options(loop.Evaluator.Options):
        # The label of the bpo optimiser whose rewrites are compared.
        optimiser: str = "bpo"

    def evaluate(self, ctx) -> dict[str, float]:
        if ctx.round == 0:
            return {}
        rows = ctx.store.rows(
            "select pr.id, pr.parent_id, pr.source, pr.kind, json_extract(pr.meta, '$.bpo') as bpo "
            "from round_prompts rp join prompts pr on pr.id = rp.prompt_id where rp.round = ?",
            [ctx.round])
        answered = {r["id"] for r in rows}
        pairs = [(r["parent_id"], r["id"]) for r in rows
                 if r["bpo"] == "rewrite" and r["source"] == self.options.optimiser
                 and r["parent_id"] in answered]
        if not pairs:
            return {}
        per_candidate = ctx.store.rows(
            "select c.prompt_id, avg(j.score) as score from candidates c "
            "join judgments j on j.candidate_id = c.id "
            "where c.round = ? and c.source = 'policy' and j.score is not null group by c.id",
            [ctx.round])
        by_prompt: dict[int, list[float]] = {}
        for r in per_candidate:
            by_prompt.setdefault(r["prompt_id"], []).append(r["score"])
        deltas = [
            sum(by_prompt[rw]) / len(by_prompt[rw]) - sum(by_prompt[orig]) / len(by_prompt[orig])
            for orig, rw in pairs if by_prompt.get(orig) and by_prompt.get(rw)
        ]
        if not deltas:
            return {"bpo/compared": 0.0}
        return {"bpo/score_delta": sum(deltas) / len(deltas), "bpo/compared": float(len(deltas))}


@loop.hookimpl
def register_prompt_optimisers(register):
    register(BPO)


@loop.hookimpl
def register_evaluators(register):
    register(BPOEvaluator)
