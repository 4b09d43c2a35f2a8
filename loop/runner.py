"""The round protocol and the resume ledger (run folders are made by loop.runs).

``start`` validates a config and makes its run folder (see loop/runs.py), ``resume``
reopens one, and ``Runner.run`` executes the rounds. Round 0 evaluates the starting policy; rounds 1..N run the seven ``PHASES``
(see the ``phase_start`` hook in loop/hookspecs.py for what each does).

The ledger is the ``phases`` table: a phase's results and its done-mark are committed
in one transaction, so a resumed run skips done phases and re-runs an interrupted one
from scratch with the same seed. A killed-and-resumed run therefore ends with the same
stored results as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loop import components as c
from loop import integrity, judge_quality, plugins
from loop.config import RunConfig
from loop.context import Context
from loop.errors import PhaseFailed, SelfloopError, UserError
from loop.lock import RunLock
from loop.runs import (  # noqa: F401 - re-exported: loop.runner is the entry point
    CONFIG_FILE,
    DB_FILE,
    FROZEN_ON_RESUME,
    Components,
    _override_saved,
    _refuse_existing,
    build_components,
    check_runs_dir,
    create_run,
    load_run_config,
    prepare,
    reopen_run,
    require_run_folder,
    resolve_model_path,
    resolved_config,
)
from loop.store import Store

PHASES = ("propose", "optimise", "generate", "judge", "select", "update", "evaluate")


class Interrupted(SelfloopError):
    exit_code = 130


@dataclass
class RunInfo:
    """What lifecycle hooks get as ``run``."""

    name: str
    run_dir: Path
    config: RunConfig
    rounds: int
    resumed: bool
    store: Store
    model_path: str | None = None


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


class Runner:
    def __init__(self, run_dir: Path, config: RunConfig, comps: Components, model_path: str,
                 *, resumed: bool, progress_interval: float = 0.5, lock: RunLock | None = None):
        self.run_dir = Path(run_dir)
        self.config = config
        self.comps = comps
        self.model_path = model_path
        self.resumed = resumed
        self.pm = plugins.get_manager()
        self.hook = self.pm.hook
        self.lock = lock or RunLock(self.run_dir)  # resume takes it before changing anything
        self.store: Store | None = None
        self.info: RunInfo | None = None
        self._policy = None
        self._set_up: set[int] = set()
        self._current: c.Component | None = None  # the component running now, for errors
        self._stop_requested = False
        self._progress_interval = progress_interval
        self._last_progress_write = 0.0

    # -- the policy shared by the transformers generator and PEFT updaters --------

    def policy(self):
        if self._policy is None:
            from loop.policy import Policy

            m = self.config.model
            self._policy = Policy(self.model_path, device=m.device, dtype=m.dtype,
                                  trust_remote_code=m.trust_remote_code, threads=m.threads)
        return self._policy

    # -- signals -----------------------------------------------------------------

    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        self._emit(None, None, "warning",
                   "Ctrl-C: stopping after the current phase (Ctrl-C again to stop now; "
                   "the phase is then re-run on resume)", store=False)

    # -- entry point ---------------------------------------------------------------

    def run(self) -> str:
        # Runs never download: a model must be a local folder or already in the hub cache.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.lock.acquire()
        old_handler = None
        try:
            self.store = Store.open(self.run_dir / DB_FILE)
            self.info = RunInfo(self.config.name, self.run_dir, self.config, self.config.rounds,
                                self.resumed, self.store, self.model_path)
            try:
                old_handler = signal.signal(signal.SIGINT, self._on_sigint)
            except ValueError:  # not the main thread
                old_handler = None
            self.store.set_run(status="running")
            self.hook.run_start(run=self.info)
            if self.resumed:
                self._emit(None, None, "info", f"resumed (pid {os.getpid()})")
            status = "failed"
            try:
                for r in range(0, self.config.rounds + 1):
                    self._round(r)
                status = "completed"
            except (KeyboardInterrupt, Interrupted):
                status = "interrupted"
                raise Interrupted(
                    f"stopped; `selfloop resume {self.run_dir}` continues where it stopped"
                ) from None
            finally:
                self.store.set_run(status=status)
                self.hook.run_end(run=self.info, status=status)
            return status
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            for comp in self.comps.all():
                try:
                    comp.close()
                except Exception:  # closing must not hide the real outcome
                    pass
            if self.store is not None:
                self.store.close()
            self.lock.release()

    def _round(self, r: int) -> None:
        row = self.store.round_row(r)
        if row is not None and row["status"] == "done":
            return
        self.hook.round_start(run=self.info, round=r)
        t0 = time.monotonic()
        phases = ("evaluate",) if r == 0 else PHASES
        for phase in phases:
            if self._stop_requested:
                raise Interrupted()
            self._phase(r, phase, t0)
        self.hook.round_end(run=self.info, round=r, metrics=self.store.metrics(r))

    # -- one phase -----------------------------------------------------------------

    def _adapter_for(self, r: int, phase: str) -> tuple[str | None, str]:
        """The policy a phase uses: the previous round's, or this round's in evaluate."""
        source_round = r if phase == "evaluate" else r - 1
        if source_round <= 0:
            return None, "base"
        row = self.store.round_row(source_round)
        if phase == "evaluate":
            # This round's update committed rounds.adapter ahead of evaluate.
            row = self.store.round_row(r)
        if row is None or row["policy"] is None:
            raise RuntimeError(f"round {source_round} has no policy recorded")
        adapter = row["adapter"]
        if adapter:
            integrity.verify_adapter(self.store, self.run_dir, adapter)  # before anyone loads it
        return (str(self.run_dir / adapter) if adapter else None), row["policy"]

    def _context(self, r: int, phase: str) -> Context:
        adapter, label = self._adapter_for(r, phase)
        system = None
        if r > 0 and phase not in ("propose", "optimise"):
            rows = self.store.rows(
                "select system from round_prompts where round = ? and system is not null limit 1", [r]
            )
            system = rows[0]["system"] if rows else None
        return Context(
            config=self.config, run_dir=self.run_dir, round=r, phase=phase, adapter=adapter,
            policy_label=label, store=self.store, generator=self.comps.generator, system=system,
            cache_dir=Path(self.config.runs_dir) / ".cache", _policy_factory=self.policy,
            lora_rank=self.comps.updater.lora_rank(),
            _progress=lambda **kw: self._progress(r, phase, **kw),
            _event=lambda **kw: self._emit(r, phase, kw["level"], kw["message"], kw["data"]),
        )

    def _phase(self, r: int, phase: str, round_t0: float) -> None:
        if self.store.phase_status(r, phase) == "done":
            return
        attempt = self.store.start_phase(r, phase)
        if attempt > 1:
            self._emit(r, phase, "info", f"re-running {phase} from scratch (attempt {attempt})")
        t0 = time.monotonic()
        self._current = None
        try:
            # Inside the try: an observer that raises fails the phase cleanly instead of
            # leaving it marked running.
            self.hook.phase_start(run=self.info, round=r, phase=phase)
            ctx = self._context(r, phase)
            _seed_everything(ctx.seed)
            write = getattr(self, f"_do_{phase}")(ctx)
            seconds = time.monotonic() - t0
            with self.store.transaction() as db:
                write(db)
                if ctx.reported:  # metrics components measured along the way (ctx.metric)
                    self.store.put_metrics(db, r, ctx.reported, "components", phase)
                self.store.end_phase(db, r, phase, "done", seconds)
                if phase == "evaluate":
                    row = self.store.round_row(r)
                    policy = (row["policy"] or ctx.policy_label) if r else "base"
                    self.store.end_round(db, r, policy, row["adapter"] if r else None,
                                         time.monotonic() - round_t0)
        except (KeyboardInterrupt, Interrupted):
            self._end_failed(r, phase, t0, "interrupted", "interrupted by the user", None)
            raise
        except UserError as e:
            plugin = getattr(self._current, "plugin", None)
            self._end_failed(r, phase, t0, "failed", str(e), plugin, traceback.format_exc())
            raise
        except PhaseFailed as e:
            self._end_failed(r, phase, t0, "failed", str(e), e.plugin, traceback.format_exc())
            raise
        except Exception as e:
            comp = self._current
            plugin = getattr(comp, "plugin", None)
            who = f"{comp.kind} {comp.label!r} (plugin {plugin})" if comp is not None else "the runner"
            message = f"{phase} failed in {who}: {type(e).__name__}: {e}"
            self._end_failed(r, phase, t0, "failed", message, plugin, traceback.format_exc())
            raise PhaseFailed(
                f"round {r} {message}. The traceback is in the events table; "
                f"`selfloop resume {self.run_dir}` retries the phase",
                plugin=plugin,
            ) from e
        self.hook.phase_end(run=self.info, round=r, phase=phase, status="done",
                            seconds=time.monotonic() - t0)

    def _end_failed(self, r, phase, t0, status, message, plugin, tb=None):
        seconds = time.monotonic() - t0
        with self.store.transaction() as db:
            self.store.end_phase(db, r, phase, status, seconds, message, plugin)
        self._emit(r, phase, "error" if status == "failed" else "warning", message,
                   {"traceback": tb} if tb else None, plugin=plugin)
        self.hook.phase_end(run=self.info, round=r, phase=phase, status=status, seconds=seconds)

    def _call(self, comp: c.Component, method: str, ctx: Context, *args, **kwargs):
        """Call a component, remembering it so a failure names its plugin."""
        self._current = comp
        if id(comp) not in self._set_up:
            comp.setup(ctx)
            self._set_up.add(id(comp))
        result = getattr(comp, method)(ctx, *args, **kwargs)
        self._current = None
        return result

    # -- observers -----------------------------------------------------------------

    def _progress(self, r, phase, done, total, metrics):
        self.hook.progress(run=self.info, round=r, phase=phase, done=done, total=total,
                           metrics=metrics)
        now = time.monotonic()
        if now - self._last_progress_write >= self._progress_interval or (total and done >= total):
            self._last_progress_write = now
            self.store.progress(r, phase, done, total)

    def _emit(self, r, phase, level, message, data=None, *, plugin=None, store=True):
        if store and self.store is not None:
            self.store.add_event(r, phase, level, message, plugin, data)
        self.hook.event(run=self.info, round=r, phase=phase, level=level, message=message,
                        data=data or {})

    # -- the seven phases: each returns a writer run inside the commit transaction --

    def _do_propose(self, ctx: Context) -> Callable:
        prompts: list[c.Prompt] = []
        for src in self.comps.prompt_sources:
            new = self._call(src, "propose", ctx)
            for p in new:
                p.source = p.source or src.label
            prompts.extend(new)
        if not prompts:
            raise UserError(f"round {ctx.round}: the prompt sources proposed no prompts; check [[prompts]]")

        def write(db):
            for p in prompts:
                self.store.insert_prompt(db, p, ctx.round)
            self.store.put_metrics(db, ctx.round, {"prompts/proposed": len(prompts)}, "runner", "propose")

        return write

    def _do_optimise(self, ctx: Context) -> Callable:
        prompts = [p for p in self.store.load_prompts(ctx.round, generate_only=False)
                   if p.kind != "rewrite"]
        system = None
        new: list[c.Prompt] = []
        instructions: list[c.Instruction] = []
        metrics: dict[str, float] = {}
        for opt in self.comps.optimisers:
            ctx.system = system
            res = self._call(opt, "optimise", ctx, prompts)
            prompts = res.prompts
            system = res.system if res.system is not None else system
            new.extend(res.new_prompts)
            for ins in res.instructions:
                ins.optimiser = opt.label
            instructions.extend(res.instructions)
            metrics.update(res.metrics)

        def write(db):
            for p in new:
                if p.id is None:
                    p.source = p.source or "optimiser"
                    self.store.insert_prompt(db, p, ctx.round)
            for i, p in enumerate(prompts):
                if p.id is None:
                    self.store.insert_prompt(db, p, ctx.round)
                db["round_prompts"].insert(
                    {"round": ctx.round, "position": i, "prompt_id": p.id, "system": system or p.system}
                )
            for ins in instructions:
                self.store.insert_instruction(db, ins, ctx.round)
            self.store.put_metrics(db, ctx.round, metrics, "optimisers", "optimise")

        return write

    def _do_generate(self, ctx: Context) -> Callable:
        prompts = self.store.load_prompts(ctx.round)
        g = self.config.generate
        chats = []
        for p in prompts:
            chat = p.chat()
            if ctx.system and not p.system:
                chat = [{"role": "system", "content": ctx.system}, *chat]
            chats.append(chat)
        sampling = c.Sampling(n=g.n, temperature=g.temperature, top_p=g.top_p,
                              max_new_tokens=g.max_new_tokens, seed=ctx.seed)
        outs = self._call(self.comps.generator, "generate", ctx, chats, sampling, adapter=ctx.adapter)
        self._current = self.comps.generator  # a malformed result is the generator's fault
        if len(outs) != len(prompts) or any(len(o) != g.n for o in outs):
            raise RuntimeError(
                f"generator returned {len(outs)} lists for {len(prompts)} prompts "
                f"(each must hold n={g.n} completions)"
            )
        self._current = None
        cands = [
            c.Candidate(prompt=p, text=o.text, policy=ctx.policy_label, sample_index=i,
                        num_tokens=o.num_tokens, finish_reason=o.finish_reason,
                        logprob_sum=o.logprob_sum)
            for p, samples in zip(prompts, outs)
            for i, o in enumerate(samples)
        ]
        lengths = [x.num_tokens or 0 for x in cands]
        metrics = {
            "generate/candidates": len(cands),
            "generate/mean_tokens": sum(lengths) / max(len(lengths), 1),
            "generate/truncated_rate": sum(x.finish_reason == "length" for x in cands) / max(len(cands), 1),
        }

        def write(db):
            for cand in cands:
                self.store.insert_candidate(db, cand, ctx.round)
            self.store.put_metrics(db, ctx.round, metrics, "runner", "generate")

        return write

    def _load_round(self, r: int) -> tuple[dict[int, c.Prompt], list[c.Candidate]]:
        prompts = {p.id: p for p in self.store.load_prompts(r, generate_only=False)}
        return prompts, self.store.load_candidates(r, prompts)

    def _do_judge(self, ctx: Context) -> Callable:
        _, cands = self._load_round(ctx.round)
        judgments: list[c.Judgment] = []
        new_cands: list[c.Candidate] = []
        offered: list[c.Pair] = []
        metrics: dict[str, float] = {}
        for judge in self.comps.judges:
            res = self._call(judge, "judge", ctx, cands + new_cands)
            for j in res.judgments:
                j.judge = judge.label
            judgments.extend(res.judgments)
            new_cands.extend(res.candidates)
            for p in res.pairs:
                p.source = p.source if p.source != "selector" else judge.label
            offered.extend(res.pairs)
            # Per judge, under its label: its own metrics, then the runner's quality figures.
            metrics.update(judge_quality.prefixed(res.metrics, judge.label))
            metrics.update(judge_quality.judge_figures(res.judgments, judge.label))
        failures = sum(j.score is None for j in judgments)
        metrics["judge/parse_failures"] = failures
        metrics["judge/parse_failure_rate"] = failures / max(len(judgments), 1)
        metrics["judge/judgments"] = len(judgments)
        valid = [j.score for j in judgments if j.score is not None]
        if valid:
            metrics["judge/mean_score"] = sum(valid) / len(valid)

        def write(db):
            for cand in new_cands:
                cand.policy = cand.policy or ctx.policy_label
                self.store.insert_candidate(db, cand, ctx.round)
            for j in judgments:
                self.store.insert_judgment(db, j, ctx.round)
            for p in offered:
                self.store.insert_pair(db, p, ctx.round, selected=False)
            self.store.put_metrics(db, ctx.round, metrics, "judges", "judge")

        return write

    def combined_scores(self, r: int) -> dict[int, float]:
        """Per candidate: each judge's mean valid score, then the weighted mean over judges."""
        per: dict[int, dict[str, list[float]]] = {}
        for row in self.store.rows(
            "select candidate_id, judge, score from judgments where round = ? and score is not null", [r]
        ):
            per.setdefault(row["candidate_id"], {}).setdefault(row["judge"], []).append(row["score"])
        out = {}
        for cid, by_judge in per.items():
            num = den = 0.0
            for judge, scores in by_judge.items():
                w = self.comps.weights.get(judge, 1.0)
                num += w * sum(scores) / len(scores)
                den += w
            out[cid] = num / den
        return out

    def _do_select(self, ctx: Context) -> Callable:
        prompts, cands = self._load_round(ctx.round)
        by_id = {x.id: x for x in cands}
        offered = [
            c.Pair(prompt=prompts[row["prompt_id"]], chosen=by_id[row["chosen_id"]],
                   rejected=by_id[row["rejected_id"]], chosen_score=row["chosen_score"],
                   rejected_score=row["rejected_score"], source=row["source"])
            for row in self.store.rows("select * from pairs where round = ? and selected = 0 order by id",
                                       [ctx.round])
        ]
        scores = self.combined_scores(ctx.round)
        sel = self._call(self.comps.selector, "select", ctx, cands, scores, offered)
        metrics = dict(sel.metrics)
        metrics.setdefault("select/pairs", len(sel.pairs))
        metrics.setdefault("select/selected", len(sel.selected))
        if sel.pairs:
            chosen = [p.chosen.num_tokens or 0 for p in sel.pairs]
            rejected = [p.rejected.num_tokens or 0 for p in sel.pairs]
            metrics["select/chosen_tokens"] = sum(chosen) / len(chosen)
            metrics["select/rejected_tokens"] = sum(rejected) / len(rejected)
        metrics.update(judge_quality.selection_figures(sel.pairs, cands, scores))

        def write(db):
            for p in sel.pairs:
                self.store.insert_pair(db, p, ctx.round, selected=True)
            for s in sel.selected:
                self.store.insert_selected(db, s, ctx.round)
            self.store.put_metrics(db, ctx.round, metrics, self.comps.selector.label, "select")

        return write

    def load_selection(self, r: int) -> c.Selection:
        prompts, cands = self._load_round(r)
        by_id = {x.id: x for x in cands}
        pairs = [
            c.Pair(prompt=prompts[row["prompt_id"]], chosen=by_id[row["chosen_id"]],
                   rejected=by_id[row["rejected_id"]], chosen_score=row["chosen_score"],
                   rejected_score=row["rejected_score"], source=row["source"], id=row["id"])
            for row in self.store.rows("select * from pairs where round = ? and selected = 1 order by id", [r])
        ]
        selected = [
            c.Selected(candidate=by_id[row["candidate_id"]], score=row["score"], rank=row["rank"],
                       label=row["label"], group=row["group_key"], id=row["id"])
            for row in self.store.selected(r)
        ]
        return c.Selection(pairs=pairs, selected=selected)

    def _do_update(self, ctx: Context) -> Callable:
        from loop.policy import install_adapter

        selection = self.load_selection(ctx.round)
        adapters = self.run_dir / "adapters"
        adapters.mkdir(exist_ok=True)
        final = adapters / f"round-{ctx.round}"
        tmp = adapters / f".round-{ctx.round}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)  # a half-written adapter from a killed attempt
        if len(selection) == 0:
            self._emit(ctx.round, "update", "warning",
                       "no training examples this round: the policy stays as it was")
            prev = ctx.adapter
            result = c.UpdateResult()
            policy, adapter_rel = ctx.policy_label, (str(Path(prev).relative_to(self.run_dir)) if prev else None)
        else:
            gen = self.comps.generator
            self._call_plain(gen, "release", ctx)
            try:
                result = self._call(self.comps.updater, "update", ctx, selection, str(tmp))
            finally:
                self._call_plain(gen, "reclaim", ctx)
            self._current = self.comps.updater
            _check_losses(result, self.comps.updater, self.run_dir)
            install_adapter(str(tmp), str(final))
            self._current = None
            policy, adapter_rel = f"round-{ctx.round}", str(final.relative_to(self.run_dir))
            files = integrity.hash_folder(final)
        metrics = dict(result.metrics)
        metrics["train/steps"] = len(result.steps)

        def write(db):
            for step in result.steps:
                self.store.insert_train_step(db, step, ctx.round)
            self.store.put_metrics(db, ctx.round, metrics, self.comps.updater.label, "update")
            db.execute("update rounds set policy = ?, adapter = ? where round = ?",
                       [policy, adapter_rel, ctx.round])
            if len(selection):
                integrity.record_adapter(db, ctx.round, adapter_rel, files)

        return write

    def _call_plain(self, comp, method, ctx):
        self._current = comp
        getattr(comp, method)(ctx)
        self._current = None

    def _do_evaluate(self, ctx: Context) -> Callable:
        metrics: dict[str, float] = {}
        for ev in self.comps.evaluators:
            out = self._call(ev, "evaluate", ctx)
            bad = [k for k in out if "/" not in k]
            if bad:
                raise RuntimeError(f"metric names must be group/name, got {bad}")
            metrics.update(out)

        def write(db):
            self.store.put_metrics(db, ctx.round, metrics, "evaluators", "evaluate")

        return write


def _check_losses(result: c.UpdateResult, updater: c.Updater, run_dir: Path) -> None:
    """A NaN/inf loss is a failed update (the adapter is garbage), never a stored NULL."""
    for step in result.steps:
        loss = step.loss
        if loss is None or not math.isfinite(loss):
            raise PhaseFailed(
                f"update: updater {updater.label!r} (plugin {updater.plugin}) reported a "
                f"non-finite loss ({loss}) at step {step.step}; the adapter is not kept. Lower "
                f"the learning rate, e.g. `selfloop resume {run_dir} --set "
                "updater.learning_rate=1e-5`", plugin=updater.plugin,
            )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def start(config_path: str | None, overrides=(), *, data: dict | None = None, extra_plugins=(),
          replace: bool = False, version: str = "0") -> Runner:
    """Validate, create the run folder and return a Runner (not yet running)."""
    config, comps = prepare(config_path, overrides, data=data, extra_plugins=extra_plugins)
    # Before the model: a builder may take minutes, and it writes its cache under runs_dir.
    check_runs_dir(config)
    _refuse_existing(config, replace)
    model_path = resolve_model_path(config, comps)
    run_dir = create_run(config, comps, model_path, version, replace=replace)
    return Runner(run_dir, config, comps, model_path, resumed=False)



def resume(run_dir: str | Path, extra_plugins=(), overrides: list[str] = (),
           redo: str | None = None) -> Runner:
    """Continue a run (the caller runs the returned Runner); see ``loop.runs.reopen_run``:
    the lock is taken first, the database's config is the authority, ``overrides``
    (``--set``) and ``redo`` (``round-N.PHASE``) are applied once everything is valid."""
    run_dir, config, comps, model_path, lock = reopen_run(
        run_dir, extra_plugins=extra_plugins, overrides=overrides, redo=redo)
    return Runner(run_dir, config, comps, model_path, resumed=True, lock=lock)
