"""Self-instruct prompt creation: the policy writes new prompts from few-shot examples.

After the instruction creation step of Self-Rewarding Language Models (Yuan et al. 2024,
sec. 2.3, itself after Self-Instruct, Wang et al. 2023). Config::

    [[prompts]]
    name = "self_instruct"
    per_round = 16        # new prompts asked for each round
    examples = 4          # existing prompts shown in each request

The algorithm (``propose``):

1. The pool is every prompt stored in earlier rounds (originals and derived ones) plus
   the ``seeds`` of the config. An empty pool proposes nothing this round.
2. For each of ``per_round`` requests, sample ``examples`` prompts from the pool
   (``ctx.rng``) and render ``prompts/self_instruct.j2``: the examples as a numbered list,
   then a request for one more.
3. The policy (``ctx.generator`` with ``ctx.adapter``) writes one reply per request; its
   first paragraph, stripped of a leading list number, is the candidate prompt.
4. Filters before a candidate enters the pool (Self-Instruct, sec. 2.4): it is dropped
   when it is empty, shorter than ``min_words`` or longer than ``max_words`` words, holds
   one of ``exclude_words`` (tasks a text model cannot do: images, plots, files...), or
   when its word n-gram overlap with any stored prompt, any seed, or a prompt already kept
   this round is ``max_overlap`` or more (``ngram_overlap``: shared n-grams over the
   smaller set; the paper uses ROUGE-L < 0.7). ``self_instruct/kept_rate`` is the share
   kept; ``self_instruct/dropped_<reason>`` counts the rest by reason. Stored prompts
   are looked up in the run's n-gram index (``NgramIndex``, table ``prompt_ngrams``):
   only those sharing an n-gram with the new prompt are compared, so the cost per new
   prompt does not grow with the run; the decisions are those of comparing with all.
5. Each kept prompt is ``kind="derived"``, its ``parent`` is the first stored example it
   was shown, and ``meta["derived_from"]`` lists the ids of every stored example.
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

import loop
from loop.templates import template_option

_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"^\s*\d+\s*[.)]\s*")
CHUNK = 500  # ids or n-grams per IN (...) list: well under SQLite's bound-variable limit


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams of ``text``; a text shorter than n gives its whole word list."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(a: set, b: set) -> float:
    """Shared n-grams over the smaller set (1.0: one text's n-grams all occur in the other)."""
    if not a or not b:
        return 0.0
    return len(a & b) / min(len(a), len(b))


class NgramIndex:
    """Stored prompts' word n-grams, kept in the run (table ``prompt_ngrams``, m006).

    ``catch_up`` adds every stored prompt the index lacks (the ones stored since it last
    ran; the whole table on a first use or after the rows were deleted), in its own
    transaction: the rows derive from committed prompts only, so a propose killed after
    it leaves a valid index. ``duplicate`` asks SQLite for the stored prompts (of rounds
    before ``round``) sharing an n-gram with the new one and how many they share; a prompt
    sharing none has overlap 0, below any ``max_overlap``, so the answer is the same as
    comparing with every stored prompt, at a cost set by the new prompt's n-grams.
    """

    def __init__(self, store, n: int):
        self.store = store
        self.n = n

    @staticmethod
    def key(gram: tuple[str, ...]) -> str:
        return " ".join(gram)  # words are \w+ runs: a space never occurs inside one

    def catch_up(self) -> int:
        """Index the prompts stored since the last call; returns how many."""
        conn = self.store.conn
        with self.store.transaction():
            (top,) = conn.execute("select coalesce(max(prompt_id), 0) from prompt_ngrams "
                                  "where n = ?", [self.n]).fetchone()
            new = conn.execute("select id, round, text from prompts where id > ? order by id",
                               [top]).fetchall()
            rows = []
            for pid, round, text in new:
                grams = ngrams(text, self.n)
                rows += [(self.n, self.key(g), pid, round, len(grams)) for g in grams]
            conn.executemany("insert into prompt_ngrams (n, gram, prompt_id, round, grams) "
                             "values (?, ?, ?, ?, ?)", rows)
        return len(new)

    @staticmethod
    def lookup_sql(grams: int) -> str:
        """The stored prompts holding any of ``grams`` n-grams: one primary-key seek each."""
        return ("select prompt_id, grams from prompt_ngrams where n = ? and round < ? "
                f"and gram in ({', '.join('?' * grams)})")

    def duplicate(self, grams: set, max_overlap: float, round: int) -> bool:
        """Whether a prompt stored before ``round`` overlaps ``grams`` by ``max_overlap`` or more."""
        if not grams:
            return False
        keys = [self.key(g) for g in grams]
        shared: dict[int, int] = {}
        size: dict[int, int] = {}
        # No GROUP BY here: with one, SQLite walks idx_prompt_ngrams_n (every row of this
        # n, in prompt order) instead of seeking the primary key once per n-gram. Chunks
        # keep a very long prompt under SQLite's limit on bound variables.
        for start in range(0, len(keys), CHUNK):
            part = keys[start:start + CHUNK]
            for pid, g in self.store.conn.execute(self.lookup_sql(len(part)), [self.n, round, *part]):
                shared[pid] = shared.get(pid, 0) + 1
                size[pid] = g
        return any(k / min(len(grams), size[pid]) >= max_overlap for pid, k in shared.items())


def parse_reply(text: str) -> str:
    """The new prompt in a reply: its first non-blank paragraph without a list number."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if not paragraphs:
        return ""
    return _NUMBER.sub("", paragraphs[0], count=1).strip()


class SelfInstructPrompts(loop.PromptSource):
    """New prompts written by the policy, de-duplicated against everything stored."""

    name = "self_instruct"

    class Options(loop.PromptSource.Options):
        # Requests per round; fewer prompts are kept when replies are empty or duplicates.
        per_round: int = Field(16, ge=1)
        # Existing prompts shown as examples in each request (fewer if the pool is smaller).
        examples: int = Field(4, ge=1)
        # Prompts to start from when nothing is stored yet (round 1 of a run).
        seeds: list[str] = []
        # A name in prompts/ (without .j2) or a path to a .j2 file using {examples}.
        template: template_option("examples") = "self_instruct"
        # Sampling for the writer: diverse on purpose (Self-Instruct samples at 0.7-1.0).
        temperature: float = Field(1.0, ge=0.0)
        top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling for the writer")
        max_new_tokens: int = Field(128, ge=1, description="longest new prompt, in tokens")
        # Word n-gram size and the overlap at or above which a prompt is a near-duplicate.
        ngram: int = Field(3, ge=1)
        max_overlap: float = Field(0.7, gt=0.0, le=1.0, description=(
            "n-gram overlap at or above which a new prompt is a near-duplicate (dropped)"))
        # Length limits in words (Self-Instruct drops too short and too long instructions).
        min_words: int = Field(3, ge=1)
        max_words: int = Field(150, ge=1, description="longest new prompt kept, in words")
        # Prompts holding one of these words are dropped (the paper's list: tasks a text
        # model cannot do); [] keeps everything.
        exclude_words: list[str] = ["image", "images", "graph", "graphs", "picture", "pictures",
                                    "file", "files", "map", "maps", "draw", "plot", "video",
                                    "audio", "music", "flowchart", "diagram"]

        @model_validator(mode="after")
        def _lengths(self):
            if self.max_words < self.min_words:
                raise ValueError(f"max_words ({self.max_words}) is below min_words ({self.min_words})")
            return self

    def setup(self, ctx) -> None:
        self._template(ctx)

    def _template(self, ctx):
        return ctx.template(self.options.template, {"examples"})

    def propose(self, ctx) -> list[loop.Prompt]:
        opts = self.options
        if ctx.generator is None:
            raise loop.UserError("self_instruct needs the run's generator")
        # The pool is the seeds, then the stored originals and derived prompts by id. Only
        # ids are read for all of it; the texts just for the examples drawn. Drawing from
        # range(len(pool)) takes the same positions as drawing from the pool itself.
        seeds = list(opts.seeds)
        ids = [i for (i,) in ctx.store.conn.execute(
            "select id from prompts where round < ? and kind in ('original', 'derived') "
            "order by id", [ctx.round])]
        size = len(seeds) + len(ids)
        if not size:
            ctx.event("self_instruct: no prompts to take examples from yet; proposing none")
            return []
        rng = ctx.rng(self.label)
        template = self._template(ctx)
        picks = [rng.sample(range(size), min(opts.examples, size)) for _ in range(opts.per_round)]
        drawn = sorted({ids[j - len(seeds)] for p in picks for j in p if j >= len(seeds)})
        rows = {}
        for start in range(0, len(drawn), CHUNK):
            part = drawn[start:start + CHUNK]
            rows.update((r["id"], r) for r in ctx.store.rows(
                f"select id, round, text from prompts where id in ({', '.join('?' * len(part))})", part))

        def example(j: int) -> tuple[dict | None, str]:  # (stored row or None, text)
            if j < len(seeds):
                return None, seeds[j]
            row = rows[ids[j - len(seeds)]]
            return row, row["text"]

        requests = [[example(j) for j in p] for p in picks]
        chats = [
            [{"role": "user", "content": template.render(examples=[t for _, t in shown])}]
            for shown in requests
        ]
        sampling = loop.Sampling(n=1, temperature=opts.temperature, top_p=opts.top_p,
                                 max_new_tokens=opts.max_new_tokens,
                                 seed=ctx.derive_seed(self.label))
        replies = ctx.generator.generate(ctx, chats, sampling, adapter=ctx.adapter, progress=False)
        index = NgramIndex(ctx.store, opts.ngram)
        index.catch_up()
        known = [ngrams(t, opts.ngram) for t in opts.seeds]  # + the ones kept this round
        kept: list[loop.Prompt] = []
        dropped = {"empty": 0, "short": 0, "long": 0, "excluded": 0, "duplicate": 0}
        excluded = {w.lower() for w in opts.exclude_words}
        for shown, reply in zip(requests, replies):
            text = parse_reply(reply[0].text)
            grams = ngrams(text, opts.ngram)
            words = _WORD.findall(text.lower())
            if not grams:
                dropped["empty"] += 1
                continue
            if len(words) < opts.min_words:
                dropped["short"] += 1
                continue
            if len(words) > opts.max_words:
                dropped["long"] += 1
                continue
            if excluded.intersection(words):
                dropped["excluded"] += 1
                continue
            if (any(ngram_overlap(grams, k) >= opts.max_overlap for k in known)
                    or index.duplicate(grams, opts.max_overlap, ctx.round)):
                dropped["duplicate"] += 1
                continue
            known.append(grams)
            rows = [r for r, _ in shown if r is not None]
            parent = None
            if rows:
                parent = loop.Prompt(text=rows[0]["text"], id=rows[0]["id"], round=rows[0]["round"])
            kept.append(loop.Prompt(
                text=text, source=self.label, kind="derived", parent=parent,
                meta={"derived_from": [r["id"] for r in rows],
                      "seed_examples": sum(r is None for r, _ in shown)},
            ))
        ctx.event(f"self_instruct: kept {len(kept)} of {len(requests)} new prompts",
                  kept=len(kept), **dropped)
        ctx.metric("self_instruct/kept_rate", len(kept) / max(len(requests), 1))
        for reason, count in dropped.items():
            ctx.metric(f"self_instruct/dropped_{reason}", count)
        return kept


@loop.hookimpl
def register_prompt_sources(register):
    register(SelfInstructPrompts)
