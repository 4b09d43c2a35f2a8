"""Numbered schema migrations of the run database.

Never edit a migration once it has landed: add ``m002_...`` instead. Each one opens with
a comment on why it exists. ``sqlite_utils.Migrations`` applies pending ones in a
transaction and records them in ``_sqlite_migrations``.

The tables are a public interface (users query them): docs/database.md documents every
column, and tests/test_store.py checks a blank database against that list.
"""

from __future__ import annotations

from sqlite_utils import Migrations

migrations = Migrations("selfloop")


@migrations()
def m001_initial(db):
    # Why: the first schema. Every row carries its round and links to its source, so any
    # number can be traced back to text: a pair to its two candidates, a candidate to its
    # prompt (and to its original, for a revision), a judgment to its candidate and judge.
    db.execute(
        """
        create table runs (
            id integer primary key,
            name text not null,
            created_at text not null,
            config text not null,          -- the resolved config, JSON
            seed integer not null,
            rounds integer not null,
            status text not null,          -- running | completed | interrupted | failed
            model_path text,               -- the base model folder the run loads
            selfloop_version text not null
        )"""
    )
    db.execute(
        """
        create table rounds (
            round integer primary key,     -- 0: the starting policy, evaluated only
            status text not null,          -- running | done
            policy text,                   -- base | round-<r>: the policy after this round
            adapter text,                  -- its adapter folder, relative to the run folder
            started_at text,
            ended_at text,
            seconds real
        )"""
    )
    db.execute(
        """
        create table phases (
            round integer not null references rounds(round),
            phase text not null,           -- propose | optimise | generate | judge | select | update | evaluate
            status text not null,          -- running | done | failed | interrupted
            attempt integer not null,      -- 1 + the number of earlier tries
            started_at text,
            ended_at text,
            seconds real,
            done integer,                  -- progress: units done of total
            total integer,
            error text,                    -- the failure's one-line summary
            plugin text,                   -- the plugin whose component failed
            primary key (round, phase)
        )"""
    )
    db.execute(
        """
        create table prompts (
            id integer primary key,
            round integer not null references rounds(round),
            text text not null,
            system text,                   -- a system instruction, if any
            source text not null,          -- the prompt source or optimiser that wrote it
            kind text not null,            -- original | rewrite | derived
            parent_id integer references prompts(id),  -- what a rewrite / derived prompt came from
            meta text                      -- JSON
        )"""
    )
    db.execute(
        """
        create table round_prompts (
            round integer not null references rounds(round),
            position integer not null,
            prompt_id integer not null references prompts(id),
            system text,                   -- the system instruction used with it this round
            primary key (round, position)
        )"""
    )
    db.execute(
        """
        create table candidates (
            id integer primary key,
            round integer not null references rounds(round),
            prompt_id integer not null references prompts(id),
            policy text not null,          -- base | round-<r>: who wrote it
            sample_index integer not null,
            text text not null,
            num_tokens integer,
            finish_reason text,            -- stop | length
            logprob_sum real,              -- sum of its tokens' log-probs under that policy
            source text not null,          -- policy | revision | ...
            parent_id integer references candidates(id),  -- a revision's original
            meta text
        )"""
    )
    db.execute(
        """
        create table judgments (
            id integer primary key,
            round integer not null references rounds(round),
            candidate_id integer not null references candidates(id),
            judge text not null,           -- the judge's label in the config
            sample_index integer not null,
            score real,                    -- NULL when the judge's output did not parse
            raw text not null,             -- the judge's own text, as written
            error text,
            meta text
        )"""
    )
    db.execute(
        """
        create table pairs (
            id integer primary key,
            round integer not null references rounds(round),
            prompt_id integer not null references prompts(id),
            chosen_id integer not null references candidates(id),
            rejected_id integer not null references candidates(id),
            chosen_score real,
            rejected_score real,
            margin real,
            source text not null,          -- selector | revision | a judge's label
            selected integer not null      -- 1: training data; 0: offered by a judge only
        )"""
    )
    db.execute(
        """
        create table selected (
            id integer primary key,
            round integer not null references rounds(round),
            candidate_id integer not null references candidates(id),
            score real,
            rank integer not null,         -- 0 is the best within its group
            label text not null,           -- top | desirable | undesirable | ranked
            group_key integer              -- usually the prompt id
        )"""
    )
    db.execute(
        """
        create table train_steps (
            id integer primary key,
            round integer not null references rounds(round),
            step integer not null,
            loss real not null,
            learning_rate real,
            grad_norm real,
            metrics text                   -- JSON: rewards/chosen, rewards/margin, ...
        )"""
    )
    db.execute(
        """
        create table metrics (
            round integer not null references rounds(round),
            name text not null,            -- group/name, e.g. eval/accuracy
            value real,
            source text,                   -- the component (or "runner") that wrote it
            phase text,
            primary key (round, name)
        )"""
    )
    db.execute(
        """
        create table events (
            id integer primary key,
            time text not null,
            round integer,
            phase text,
            level text not null,           -- info | warning | error
            message text not null,
            plugin text,
            data text                      -- JSON; a failure's traceback is in data.traceback
        )"""
    )
    for sql in (
        "create index idx_prompts_round on prompts(round)",
        "create index idx_candidates_round on candidates(round)",
        "create index idx_candidates_prompt on candidates(prompt_id)",
        "create index idx_judgments_round on judgments(round)",
        "create index idx_judgments_candidate on judgments(candidate_id)",
        "create index idx_pairs_round on pairs(round)",
        "create index idx_selected_round on selected(round)",
        "create index idx_train_steps_round on train_steps(round)",
    ):
        db.execute(sql)


@migrations()
def m002_instructions(db):
    # Why: instruction search (OPRO) scores many candidate system instructions per round
    # and reads its own history back on later rounds and after a resume. Each row is one
    # (instruction, score, round) with the optimiser that wrote it; `chosen` marks the one
    # that became the round's system instruction (also in round_prompts.system).
    db.execute(
        """
        create table instructions (
            id integer primary key,
            round integer not null references rounds(round),
            optimiser text not null,       -- the optimiser's config label
            step integer not null,         -- search step within the round (0: seeds)
            text text not null,            -- the instruction
            score real,                    -- its score; NULL when no answer could be scored
            scored_on integer not null,    -- how many judge scores the score averages
            chosen integer not null,       -- 1: the round's system instruction
            meta text                      -- JSON
        )"""
    )
    db.execute("create index idx_instructions_round on instructions(round)")


@migrations()
def m003_answers_heldout(db):
    # Why: prompts may carry a reference answer (a dataset's `answer` field) that the
    # `verify` judge and evaluator check answers against; and evaluators measure held-out
    # prompts that must never reach training. `heldout` records which prompts each
    # evaluator holds out, from which source, so the split is the same after a resume
    # and the runner can refuse a held-out prompt that reaches generation.
    db.execute("alter table prompts add column answer text")
    db.execute(
        """
        create table heldout (
            id integer primary key,
            evaluator text not null,       -- the evaluator's config label
            position integer not null,     -- 0, 1, ... within the evaluator's set
            source text not null,          -- the prompt source label or the prompts file
            split text not null,           -- heldout (split off a source) | file (its own path)
            text text not null,            -- the user message
            system text,                   -- a system instruction of its own, if any
            answer text,                   -- the reference answer, if any
            key text,                      -- the row's identity in its source (file:line), if any
            meta text                      -- JSON
        )"""
    )
    db.execute("create index idx_heldout_evaluator on heldout(evaluator)")


@migrations()
def m004_methods(db):
    # Why: three method decisions had no place to be read back. Which reference policy an
    # update's loss measured against (DPO and KTO against the previous round or the base
    # model, `updater.reference`); the system prompt the round's policy is deployed with
    # (OPRO's chosen instruction, used by evaluators too); and each BPO rewrite's gate:
    # the scores of answers to the prompt and to its rewrite, and whether it was kept.
    db.execute("alter table rounds add column reference text")
    db.execute("alter table rounds add column system text")
    db.execute(
        """
        create table rewrite_decisions (
            id integer primary key,
            round integer not null references rounds(round),
            optimiser text not null,       -- the optimiser's config label
            prompt_id integer not null references prompts(id),   -- the original
            rewrite_id integer references prompts(id),           -- the rewrite (stored either way)
            original_score real,           -- mean combined score of answers to the original
            rewrite_score real,            -- ... to the rewrite, judged against the original
            validation integer not null,   -- 1: in the sample that decides the rewriter
            kept integer not null,         -- 1: the rewrite is answered this round
            reason text not null           -- better | not better | unscored | rewriter rejected
        )"""
    )
    db.execute("create index idx_rewrite_decisions_round on rewrite_decisions(round)")


@migrations()
def m005_adapter_files(db):
    # Why: an adapter edited or damaged on disk (flipped bytes, a truncated copy) used to
    # load silently and train or evaluate garbage. Each file of an adapter folder is hashed
    # when its update installs it, in the update's commit, and checked before any phase
    # loads the adapter; a mismatch names the file and `resume --redo round-N.update`.
    db.execute(
        """
        create table adapter_files (
            round integer not null references rounds(round),  -- the round whose update wrote it
            adapter text not null,         -- its folder, relative to the run folder
            file text not null,            -- a file in that folder
            bytes integer not null,
            sha256 text not null,
            primary key (adapter, file)
        )"""
    )


@migrations()
def m006_prompt_ngrams(db):
    # Why: self_instruct drops a new prompt that overlaps a stored one, and compared it with
    # every stored prompt, re-splitting each into n-grams every round: its cost per new
    # prompt grew with the run. This inverted index (n-gram -> prompts holding it) finds
    # just the stored prompts that share an n-gram. It is derived data: rows are added for
    # prompts stored before (self_instruct catches up on the ones it lacks before each
    # propose), and leave with their prompt (`on delete cascade`; `round` for --redo).
    db.execute(
        """
        create table prompt_ngrams (
            n integer not null,            -- the n-gram size (self_instruct's `ngram`)
            gram text not null,            -- a lower-cased word n-gram, words joined by spaces
            prompt_id integer not null references prompts(id) on delete cascade,
            round integer not null references rounds(round),  -- the prompt's round
            grams integer not null,        -- how many distinct n-grams the prompt has
            primary key (n, gram, prompt_id)
        ) without rowid"""
    )
    db.execute("create index idx_prompt_ngrams_prompt on prompt_ngrams(prompt_id)")
    db.execute("create index idx_prompt_ngrams_n on prompt_ngrams(n, prompt_id)")
