"""Constitutional AI judges (Bai et al., 2022, "Constitutional AI: Harmlessness from AI
Feedback"): the policy critiques and revises its own answers under written principles
(SL-CAI, section 3), or states pairwise preferences under them (RL-CAI, section 4).

Config::

    [[judges]]
    name = "constitutional"             # SL-CAI: critique, then revise
    constitution = "constitution"       # prompts/constitution.toml, or a path to a .toml
    passes = 1                          # critique-revision passes per answer

    [[judges]]
    name = "constitutional_preference"  # RL-CAI: A-or-B preference from label log-probs
    comparisons = 3                     # pairs compared per prompt

The constitution file is a list of ``[[principles]]``, each with ``name``, ``critique``,
``revision`` and ``compare`` (see prompts/constitution.toml). It is checked when the
config is loaded: a bad file is a config error naming the file and the field.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

import loop
from loop.resources import shipped
from loop.templates import quote, template_option

# ---------------------------------------------------------------------------
# The constitution file
# ---------------------------------------------------------------------------


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    critique: str = Field(min_length=1)  # what the critic looks for
    revision: str = Field(min_length=1)  # how the answer is to be rewritten
    compare: str = Field(min_length=1)  # the A-or-B question of pairwise judging


class Example(BaseModel):
    """A worked critique-revision exchange, shown before each request (few-shot)."""

    model_config = ConfigDict(extra="forbid")

    principle: str = Field(min_length=1)  # the name of the principle it shows
    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principles: list[Principle] = Field(min_length=1)
    examples: list[Example] = []

    @model_validator(mode="after")
    def _examples_name_principles(self):
        known = {p.name for p in self.principles}
        for i, ex in enumerate(self.examples):
            if ex.principle not in known:
                raise ValueError(
                    f"examples[{i}].principle {ex.principle!r} is not a principle; "
                    f"known: {sorted(known)}")
        return self

    def shots(self, count: int) -> list[dict[str, str]]:
        """The first ``count`` examples, with their principle's requests filled in."""
        by_name = {p.name: p for p in self.principles}
        return [{"prompt": quote(ex.prompt), "response": quote(ex.response),
                 "critique_request": by_name[ex.principle].critique,
                 "revision_request": by_name[ex.principle].revision,
                 "critique": quote(ex.critique), "revision": quote(ex.revision)}
                for ex in self.examples[:count]]

    @field_validator("principles")
    @classmethod
    def _unique(cls, principles):
        names = [p.name for p in principles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"principle names must be unique; {dupes} repeat")
        return principles


def resolve_constitution(name: str, base: Path | None = None) -> Path:
    """``"constitution"`` -> prompts/constitution.toml; a path is taken relative to ``base``."""
    if name.endswith(".toml") or "/" in name:
        p = Path(name).expanduser()
        if not p.is_absolute() and base is not None:
            p = Path(base) / p
        return p
    return shipped("prompts", f"{name}.toml")


def load_constitution(path: Path) -> Constitution:
    """Read and check a constitution file; ValueError with the file and field otherwise."""
    if not path.is_file():
        raise ValueError(
            f"constitution file {path} not found; name a .toml in prompts/ (without .toml) "
            "or give a path to one"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"constitution file {path}: not valid TOML ({e}); fix the syntax") from None
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        from loop.config import format_validation_error

        field, message = format_validation_error(e, Constitution)
        raise ValueError(
            f"constitution file {path}: {field}: {message} (each [[principles]] needs name, "
            "critique, revision and compare)"
        ) from None


class _ConstitutionOptions(loop.ModelJudgeOptions):
    def constitution_file(self, base: Path | None) -> Constitution:
        return load_constitution(resolve_constitution(self.constitution, base))

    # A .toml in prompts/ (without .toml) or a path to one, relative to the config file.
    constitution: str = "constitution"
    # Only these principles (by name); empty: all of them.
    principles: list[str] = []

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        base = (info.context or {}).get("source_dir")
        self.load(base)  # a bad file or principle name fails when the config is loaded
        if self.constitution.endswith(".toml") or "/" in self.constitution:
            # stored absolute, so a resumed run (config read from the run folder) finds it
            self.constitution = str(resolve_constitution(self.constitution, base).resolve())
        return self

    def load(self, base: Path | None) -> list[Principle]:
        principles = self.constitution_file(base).principles
        if self.principles:
            known = {p.name for p in principles}
            unknown = [n for n in self.principles if n not in known]
            if unknown:
                raise ValueError(
                    f"principles {unknown} are not in {self.constitution}; known: {sorted(known)}"
                )
            principles = [p for p in principles if p.name in self.principles]
        return principles


# ---------------------------------------------------------------------------
# SL-CAI: critique and revision
# ---------------------------------------------------------------------------


class ConstitutionalJudge(loop.Judge):
    """SL-CAI critique and revision; each revision is offered as preferred to its original.

    The algorithm (Bai et al. 2022, section 3.1), per answer to revise:

    1. sample a principle from the constitution (``ctx.rng``: the same on a re-run);
    2. ask the policy to critique the current text under the principle's critique request;
    3. ask it to rewrite the text given the critique and the principle's revision request;
    4. repeat 1-3 ``passes`` times on the newest revision;
    5. store the final revision as a new candidate (``source = "revision"``, ``parent`` =
       the original, every principle, critique and intermediate revision in ``meta``) and
       offer the pair (revision preferred over original) to the selector.

    Each critique and revision request opens with the constitution file's first
    ``few_shot`` worked ``[[examples]]`` (the paper's few-shot SL-CAI prompt).

    A revision that is empty, cut off by ``max_new_tokens`` or equal to the text it
    revises ends the chain (its ``outcome`` is stored with the pass); a chain whose first
    pass is not usable adds nothing (counted in ``cai/failed``: empty or cut off, of which
    ``cai/truncated`` were cut off, or in ``cai/unchanged``); ``cai/truncated_rate`` is the
    share of all revision requests (every pass) cut off. This judge writes no scores.
    """

    name = "constitutional"

    class Options(_ConstitutionOptions):
        # Critique-revision passes per answer (the paper uses up to 4).
        passes: int = Field(1, ge=1, le=8)
        # Answers revised per prompt (the first ones sampled); None: every policy answer.
        per_prompt: int | None = Field(None, ge=1)
        # Sampling for critiques and revisions (0: greedy).
        temperature: float = Field(0.7, ge=0.0)
        critique_max_new_tokens: int = Field(256, ge=1, description="longest critique, in tokens")
        revision_max_new_tokens: int = Field(256, ge=1, description="longest revision, in tokens")
        # Templates: names in prompts/ (without .j2) or paths to .j2 files; each may place
        # the constitution's few-shot `examples`.
        critique_template: template_option("prompt", "response", "request",
                                           optional=("examples",)) = "cai_critique"
        revision_template: template_option("prompt", "response", "critique", "request",
                                           optional=("examples",)) = Field(
            "cai_revision", description="revision prompt using {prompt, response, critique, request}")
        # Worked examples from the constitution file's [[examples]] shown before each
        # critique and revision request (0: none).
        few_shot: int = Field(2, ge=0)

    def setup(self, ctx) -> None:
        self._templates(ctx)
        self.options.load(ctx.config.source_dir)

    def _templates(self, ctx):
        o = self.options
        shots = {"examples"}
        return (ctx.template(o.critique_template, {"prompt", "response", "request"}, shots),
                ctx.template(o.revision_template, {"prompt", "response", "critique", "request"},
                             shots))

    def judge(self, ctx, candidates: list[loop.Candidate]) -> loop.JudgeResult:
        if ctx.generator is None:
            raise RuntimeError("the constitutional judge needs the run's generator")
        opts = self.options
        principles = opts.load(ctx.config.source_dir)
        shots = opts.constitution_file(ctx.config.source_dir).shots(opts.few_shot)
        critique_t, revision_t = self._templates(ctx)
        originals = _to_revise(candidates, opts.per_prompt)
        result = loop.JudgeResult()  # counts the critiques and revisions written
        rng = ctx.rng(self.label, "principles")
        # chain[i]: the passes so far of originals[i]; text[i]: the text the next pass revises.
        chains: list[list[dict]] = [[] for _ in originals]
        text = [c.text for c in originals]
        live = list(range(len(originals)))
        # Progress in requests: a critique and a revision per original and pass (answers
        # that stop being revised skip ahead at the end of their pass).
        total = 2 * opts.passes * len(originals)
        for step in range(opts.passes):
            if not live:
                break
            chosen = {i: rng.choice(principles) for i in live}
            base = 2 * step * len(originals)
            critiques = self._ask(ctx, [
                critique_t.render(prompt=quote(originals[i].prompt.text), response=quote(text[i]),
                                  request=chosen[i].critique, examples=shots) for i in live
            ], opts.critique_max_new_tokens, ("critique", step), result,
                lambda done, _, b=base: ctx.progress(b + done, total))
            revisions = self._ask(ctx, [
                revision_t.render(prompt=quote(originals[i].prompt.text), response=quote(text[i]),
                                  critique=quote(crit.text.strip()), request=chosen[i].revision,
                                  examples=shots)
                for i, crit in zip(live, critiques)
            ], opts.revision_max_new_tokens, ("revision", step), result,
                lambda done, _, b=base + len(live): ctx.progress(b + done, total))
            still = []
            for i, crit, rev in zip(live, critiques, revisions):
                new = rev.text.strip()
                outcome = ("empty" if not new else "truncated" if rev.finish_reason == "length"
                           else "unchanged" if new == text[i].strip() else "revised")
                chains[i].append({"principle": chosen[i].name, "critique": crit.text,
                                  "revision": rev.text, "finish_reason": rev.finish_reason,
                                  "num_tokens": rev.num_tokens, "outcome": outcome,
                                  "used": outcome == "revised"})
                if outcome != "revised":
                    continue
                text[i] = new
                still.append(i)
            live = still
            ctx.progress(2 * (step + 1) * len(originals), total)
        new_cands: list[loop.Candidate] = []
        pairs: list[loop.Pair] = []
        outcomes = {"empty": 0, "truncated": 0, "unchanged": 0}
        asked = [p for chain in chains for p in chain]
        cut = sum(p["outcome"] == "truncated" for p in asked)
        for original, chain, final in zip(originals, chains, text):
            used = [p for p in chain if p["used"]]
            if not used:  # the first pass gave nothing usable
                outcomes[chain[0]["outcome"]] += 1
                continue
            revision = loop.Candidate(
                prompt=original.prompt, text=final, policy=ctx.policy_label,
                sample_index=original.sample_index, num_tokens=used[-1]["num_tokens"],
                finish_reason="stop", source="revision", parent=original,
                meta={"judge": self.label, "passes": chain},
            )
            new_cands.append(revision)
            pairs.append(loop.Pair(prompt=original.prompt, chosen=revision, rejected=original,
                                   source=self.label))
        metrics = {
            "cai/revised": float(len(originals)),
            "cai/revisions": float(len(new_cands)),
            "cai/failed": float(outcomes["empty"] + outcomes["truncated"]),
            "cai/truncated": float(outcomes["truncated"]),
            "cai/unchanged": float(outcomes["unchanged"]),
            # every revision request of every pass: the share cut at revision_max_new_tokens
            # (the runner's judge/<label>/truncated_rate, which the guard reads, counts the
            # critiques too: result.count)
            "cai/truncated_rate": cut / max(len(asked), 1),
        }
        if new_cands:
            metrics["cai/length_ratio"] = _mean(
                [len(r.text) / max(len(r.parent.text), 1) for r in new_cands])
        result.candidates, result.pairs, result.metrics = new_cands, pairs, metrics
        return result

    def _ask(self, ctx, messages: list[str], max_new_tokens: int, seed_labels,
             result: loop.JudgeResult, progress=False) -> list[loop.Completion]:
        chats = [[{"role": "user", "content": m}] for m in messages]
        sampling = loop.Sampling(n=1, temperature=self.options.temperature,
                                 max_new_tokens=max_new_tokens,
                                 seed=ctx.derive_seed(self.label, *seed_labels))
        out = ctx.generator.generate(ctx, chats, sampling, adapter=self.judge_adapter(ctx),
                                     progress=progress)
        result.count([group[0] for group in out])
        return [group[0] for group in out]


def _to_revise(candidates, per_prompt: int | None) -> list[loop.Candidate]:
    """The policy's own answers (not other judges' revisions), ``per_prompt`` per prompt."""
    seen: dict[int, int] = {}
    out = []
    for c in candidates:
        if c.source != "policy":
            continue
        key = id(c.prompt)
        if per_prompt is not None and seen.get(key, 0) >= per_prompt:
            continue
        seen[key] = seen.get(key, 0) + 1
        out.append(c)
    return out


# ---------------------------------------------------------------------------
# RL-CAI: pairwise preference from label log-probs
# ---------------------------------------------------------------------------


# The replies a pairwise judgment chooses between (option A, option B).
LABELS = ("A", "B")


def preference_from_logprobs(a_first: tuple[float, float], b_first: tuple[float, float]):
    """P(x preferred to y) from the two orders of one comparison, and the position bias.

    ``a_first`` holds the log-probs of the replies "A" and "B" with x shown as option A;
    ``b_first`` the same with y shown as option A. Each order gives a two-way softmax;
    averaging P(x) over both orders cancels a constant preference for a position
    (Zheng et al. 2023, "Judging LLM-as-a-judge", section 3.4, swap augmentation)::

        p1 = e^{A1} / (e^{A1} + e^{B1})        x in first place
        p2 = e^{B2} / (e^{A2} + e^{B2})        x in second place
        P(x > y) = (p1 + p2) / 2
        position bias = (P1(A) + P2(A)) / 2 - 1/2   (0: none; +1/2: always the first)

    Returns ``(P(x > y), position_bias, consistent)`` where ``consistent`` says whether
    both orders prefer the same answer.
    """
    pa1 = _sigmoid(a_first[0] - a_first[1])  # P("A") in order 1
    pa2 = _sigmoid(b_first[0] - b_first[1])  # P("A") in order 2
    p1, p2 = pa1, 1.0 - pa2
    return (p1 + p2) / 2, (pa1 + pa2) / 2 - 0.5, (p1 > 0.5) == (p2 > 0.5)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class ConstitutionalPreferenceJudge(loop.Judge):
    """RL-CAI: the policy's A-or-B preference between two answers under a sampled principle.

    Per prompt, up to ``comparisons`` pairs of its candidates are compared. Each pair is
    asked in both orders; the preference is read from the log-probs of the replies "A" and
    "B" (``Generator.label_logprobs``: the label followed by end-of-turn, both labels from
    one pass over the chat), never from generated text, so it cannot fail to parse. A candidate's score is its mean probability of being
    preferred over its comparisons, in [0, 1]; the judgment's ``raw`` lists them and
    ``meta`` holds every log-prob. Metrics: ``judge/position_bias`` (mean preference for
    option A, minus one half) and ``judge/order_agreement`` (share of comparisons whose
    two orders agree).
    """

    name = "constitutional_preference"

    class Options(_ConstitutionOptions):
        # Pairs compared per prompt (sampled from all pairs); each is 2 chats (both orders).
        comparisons: int = Field(3, ge=1)
        template: template_option("prompt", "first", "second", "question") = "cai_preference"  # prompt, first, second, question
        # Chats (one per comparison and order, each scored for both labels) per
        # generator.label_logprobs call.
        batch_size: int = Field(64, ge=1)

    def setup(self, ctx) -> None:
        ctx.template(self.options.template, {"prompt", "first", "second", "question"})
        self.options.load(ctx.config.source_dir)

    def judge(self, ctx, candidates: list[loop.Candidate]) -> loop.JudgeResult:
        if ctx.generator is None:
            raise RuntimeError("the constitutional_preference judge needs the run's generator")
        opts = self.options
        principles = opts.load(ctx.config.source_dir)
        template = ctx.template(opts.template, {"prompt", "first", "second", "question"})
        rng = ctx.rng(self.label, "pairs")
        groups: dict[int, list[loop.Candidate]] = {}
        for c in candidates:
            groups.setdefault(id(c.prompt), []).append(c)
        jobs = []  # (x, y, principle)
        for group in groups.values():
            pairs = list(itertools.combinations(group, 2))
            if len(pairs) > opts.comparisons:
                pairs = rng.sample(pairs, opts.comparisons)
            jobs.extend((x, y, rng.choice(principles)) for x, y in pairs)
        chats = []  # two per comparison: x shown first, then y shown first
        for x, y, principle in jobs:
            for first, second in ((x, y), (y, x)):
                text = template.render(prompt=quote(x.prompt.text), first=quote(first.text),
                                       second=quote(second.text), question=principle.compare)
                chats.append([{"role": "user", "content": text}])
        # Both labels of a chat from one pass over it (Generator.label_logprobs), batched.
        lps: list[float] = []
        for start in range(0, len(chats), opts.batch_size):
            for row in ctx.generator.label_logprobs(ctx, chats[start:start + opts.batch_size],
                                                    LABELS, adapter=self.judge_adapter(ctx)):
                lps.extend(row)
            ctx.progress(min(start + opts.batch_size, len(chats)), len(chats))
        wins: dict[int, list[tuple[float, dict]]] = {}
        biases, agree = [], []
        for k, (x, y, principle) in enumerate(jobs):
            a1, b1, a2, b2 = lps[4 * k: 4 * k + 4]
            p, bias, consistent = preference_from_logprobs((a1, b1), (a2, b2))
            biases.append(bias)
            agree.append(consistent)
            record = {"principle": principle.name, "logprobs": [a1, b1, a2, b2]}
            wins.setdefault(id(x), []).append((p, {**record, "against": y.id, "shown": "A-first"}))
            wins.setdefault(id(y), []).append((1 - p, {**record, "against": x.id, "shown": "B-first"}))
        judgments = []
        for c in candidates:
            got = wins.get(id(c))
            if not got:
                continue
            score = _mean([p for p, _ in got])
            raw = "\n".join(f"vs candidate {m['against']} ({m['principle']}): P(preferred) = {p:.3f}"
                            for p, m in got)
            judgments.append(loop.Judgment(candidate=c, score=score, raw=raw,
                                           meta={"comparisons": [m for _, m in got]}))
        metrics = {"judge/comparisons": float(len(jobs))}
        if jobs:
            metrics["judge/position_bias"] = _mean(biases)
            metrics["judge/order_agreement"] = _mean([float(a) for a in agree])
        return loop.JudgeResult(judgments=judgments, metrics=metrics)


def _mean(xs):
    return sum(xs) / len(xs)


@loop.hookimpl
def register_judges(register):
    register(ConstitutionalJudge)
    register(ConstitutionalPreferenceJudge)
