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
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loop import components as c
from loop import guards, heldout, integrity, judge_quality, observers, plugins
from loop.blame import ComponentFailed, blame, check_result, describe
from loop.combine import combine
from loop.config import RunConfig
from loop.context import Context
from loop.diskfull import DiskFull, Reserve, disk_full, is_disk_full
from loop.errors import PhaseFailed, SelfloopError, UserError
from loop.interrupts import Interrupts, PhaseTimeout, StopNow
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
    """The run stopped on a signal; exit code 128 + the signal's number (130 for Ctrl-C)."""

    exit_code = 130

    def __init__(self, message: str = "", signal_name: str | None = None):
        import signal

        if signal_name:
            self.exit_code = 128 + int(signal.Signals[signal_name])
        super().__init__(message)


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
        self.interrupts = Interrupts(on_first=self._on_stop_signal)
        self.reserve = Reserve(self.run_dir)
        self._observer_failures: set[tuple[str, str]] = set()
        self._progress_interval = progress_interval
        self._last_progress_write = 0.0
        self._heldout = heldout.Index()

    # -- the policy shared by the transformers generator and PEFT updaters --------

    def policy(self):
        if self._policy is None:
            from loop.policy import Policy

            m = self.config.model
            self._policy = Policy(self.model_path, device=m.device, dtype=m.dtype,
                                  trust_remote_code=m.trust_remote_code, threads=m.threads,
                                  chat_template=m.chat_template, quantization=m.quantization)
        return self._policy

    # -- signals -----------------------------------------------------------------

    def _on_stop_signal(self, name: str) -> None:
        # Inside a signal handler: tell observers only; the database may be mid-write.
        key = "Ctrl-C" if name == "SIGINT" else name
        self._emit(None, None, "warning",
                   f"{key}: stopping after the current phase ({key} again to stop now; "
                   "the phase is then re-run on resume)", store=False)

    def _interrupted(self) -> Interrupted:
        name = self.interrupts.requested or "SIGINT"
        how = "Ctrl-C" if name == "SIGINT" else name
        return Interrupted(f"stopped by {how}; `selfloop resume {self.run_dir}` continues "
                           "where it stopped", signal_name=name)

    # -- entry point ---------------------------------------------------------------

    def run(self) -> str:
        # Runs never download: a model must be a local folder or already in the hub cache.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            return self._run()
        except BaseException as e:
            if is_disk_full(e) and not isinstance(e, DiskFull):
                raise disk_full(self.run_dir, "writing the run",
                                f"`selfloop resume {self.run_dir}` continues it") from e
            raise

    def _run(self) -> str:
        self.lock.acquire()
        watchers: list = []
        try:
            self.reserve.make()
            self.store = Store.open(self.run_dir / DB_FILE)
            self.info = RunInfo(self.config.name, self.run_dir, self.config, self.config.rounds,
                                self.resumed, self.store, self.model_path)
            self.interrupts.install()
            self.store.set_run(status="running")
            watchers = observers.attach(self.comps.observers, self._emit)
            self._notify("run_start")
            if self.resumed:
                self._emit(None, None, "info", f"resumed (pid {os.getpid()})")
            status = "failed"
            try:
                self._heldout = heldout.prepare(self.store, self.comps, self.config.seed)
                for r in range(0, self.config.rounds + 1):
                    self._round(r)
                status = "completed"
            except (KeyboardInterrupt, Interrupted):
                status = "interrupted"
                raise self._interrupted() from None
            except BaseException as e:
                if is_disk_full(e):
                    self.reserve.release()  # room to record how the run ended
                raise
            finally:
                self._end_run(status)
            return status
        finally:
            self.interrupts.restore()
            observers.detach(watchers)
            for comp in self.comps.all():
                try:
                    comp.close()
                except (Exception, SystemExit):  # closing must not hide the real outcome
                    pass
            if self.store is not None:
                self.store.close()
            self.reserve.release()
            self.lock.release()

    def _end_run(self, status: str) -> None:
        try:
            self.store.set_run(status=status)
        except Exception as e:
            if not is_disk_full(e):
                raise
            # Not even the reserve's room: the row keeps "running", and readers, who find
            # no live writer, show the run as interrupted.
        self._notify("run_end", status=status)

    def _round(self, r: int) -> None:
        row = self.store.round_row(r)
        if row is not None and row["status"] == "done":
            return
        self._notify("round_start", round=r)
        t0 = time.monotonic()
        phases = ("evaluate",) if r == 0 else PHASES
        for phase in phases:
            if self.interrupts.requested:
                raise self._interrupted()
            self._phase(r, phase, t0)
        self._notify("round_end", round=r, metrics=self.store.metrics(r))

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
        if phase == "evaluate":
            # The policy as deployed: with the system prompt an optimiser deployed this round.
            system = (self.store.round_row(r) or {}).get("system")
        elif r > 0 and phase not in ("propose", "optimise"):
            rows = self.store.rows(
                "select system from round_prompts where round = ? and system is not null limit 1", [r]
            )
            system = rows[0]["system"] if rows else None
        ctx = Context(
            config=self.config, run_dir=self.run_dir, round=r, phase=phase, adapter=adapter,
            policy_label=label, store=self.store, generator=self.comps.generator, system=system,
            cache_dir=Path(self.config.runs_dir) / ".cache", _policy_factory=self.policy,
            lora_rank=self.comps.updater_for(max(r, 1)).lora_rank(),
            _progress=lambda **kw: self._progress(r, phase, **kw),
            _event=lambda **kw: self._emit(r, phase, kw["level"], kw["message"], kw["data"]),
        )
        ctx._score = lambda cands: self._score_unstored(ctx, cands)
        return ctx

    def _score_unstored(self, ctx: Context, cands: list[c.Candidate]) -> list[float | None]:
        """``ctx.score``: every judge on candidates that are not stored, combined."""
        rows = []
        for judge in self.comps.judges:
            res = self._call(judge, "judge", ctx, cands)
            rows += [(id(j.candidate), id(j.candidate.prompt), judge.label, j.score)
                     for j in res.judgments]
        scores, _ = combine(rows, self.comps.weights, self.config.selection.combine)
        return [scores.get(id(x)) for x in cands]

    def _phase(self, r: int, phase: str, round_t0: float) -> None:
        if self.store.phase_status(r, phase) == "done":
            return
        attempt = self.store.start_phase(r, phase)
        if attempt > 1:
            self._emit(r, phase, "info", f"re-running {phase} from scratch (attempt {attempt})")
        t0 = time.monotonic()
        try:
            self._notify("phase_start", round=r, phase=phase)
            ctx = self._context(r, phase)
            _seed_everything(ctx.seed)
            # The deadline covers the phase's work, never its commit (loop/interrupts.py).
            self.interrupts.arm(self.config.runner.phase_timeout_s)
            try:
                write = getattr(self, f"_do_{phase}")(ctx)
                self.interrupts.check()
            finally:
                self.interrupts.disarm()
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
        except BaseException as e:
            err = self._phase_failed(r, phase, t0, e)
            if err is e:
                raise
            raise err from e
        self._notify("phase_end", round=r, phase=phase, status="done",
                     seconds=time.monotonic() - t0)

    def _phase_failed(self, r: int, phase: str, t0: float, e: BaseException) -> BaseException:
        """Record why a phase stopped (naming the component that ran); what to raise."""
        tb = "".join(traceback.format_exception(e))
        resume = f"`selfloop resume {self.run_dir}`"
        if is_disk_full(e):
            self.reserve.release()  # room to record it
            err = disk_full(self.run_dir, f"round {r} {phase}", f"{resume} re-runs the phase")
            self._end_failed(r, phase, t0, "failed", str(err), None, tb)
            return err
        if isinstance(e, (KeyboardInterrupt, Interrupted)):  # the runner's own stop
            how = self.interrupts.requested or "SIGINT"
            self._end_failed(r, phase, t0, "interrupted",
                             f"interrupted by {'Ctrl-C' if how == 'SIGINT' else how}", None)
            return e
        failed = e if isinstance(e, ComponentFailed) else None
        cause = failed.error if failed else e
        plugin = getattr(cause, "plugin", None) or (failed.plugin if failed else None)
        where = f"{failed.who}, {failed.what}" if failed else "the runner"
        if isinstance(cause, (UserError, PhaseFailed)):  # a message written for the user
            self._end_failed(r, phase, t0, "failed", str(cause), plugin, tb)
            if isinstance(cause, PhaseFailed):
                cause.plugin = plugin
            return cause
        if isinstance(cause, PhaseTimeout):
            message = (f"{phase} failed in {where}: it {cause}; raise the limit "
                       f"(--set runner.phase_timeout_s=SECONDS on resume) or find what hangs")
        else:
            message = f"{phase} failed in {where}: {describe(cause)}"
        self._end_failed(r, phase, t0, "failed", message, plugin, tb)
        return PhaseFailed(f"round {r} {message}. The traceback is in the events table; "
                           f"{resume} retries the phase", plugin=plugin)

    def _end_failed(self, r, phase, t0, status, message, plugin, tb=None):
        seconds = time.monotonic() - t0
        try:
            with self.store.transaction() as db:
                self.store.end_phase(db, r, phase, status, seconds, message, plugin)
            self._emit(r, phase, "error" if status == "failed" else "warning", message,
                       {"traceback": tb} if tb else None, plugin=plugin)
        except Exception as e:
            if not is_disk_full(e):
                raise
            # The disk is full even after the reserve: the phase row keeps "running" and
            # readers, who find no live writer, show it as interrupted.
        self._notify("phase_end", round=r, phase=phase, status=status, seconds=seconds)

    def _call(self, comp: c.Component, method: str, ctx: Context, *args, **kwargs):
        """Call a component (its setup first, once); what escapes it, or a result of the
        wrong type, is that component's failure (loop/blame.py)."""
        with blame(comp, f"in {method}()"):
            if id(comp) not in self._set_up:
                comp.setup(ctx)
                self._set_up.add(id(comp))
            result = getattr(comp, method)(ctx, *args, **kwargs)
            check_result(method, result)
        return result

    # -- observers -----------------------------------------------------------------

    def _notify(self, hook: str, **kwargs) -> None:
        """Call an observer hook's implementations one by one: one that raises is logged
        as an event naming its plugin (once per plugin and hook) and never stops the run."""
        kwargs["run"] = self.info
        failures = plugins.call_each(hook, kwargs, passthrough=(StopNow, PhaseTimeout))
        for plugin, e in failures:
            if (plugin, hook) in self._observer_failures:
                continue
            self._observer_failures.add((plugin, hook))
            message = (f"observer plugin {plugin} raised in {hook}: {describe(e)} (the run "
                       "goes on; later failures of this hook are not logged)")
            data = {"traceback": "".join(traceback.format_exception(e)), "hook": hook}
            if self.store is not None:
                try:
                    self.store.add_event(kwargs.get("round"), kwargs.get("phase"), "warning",
                                         message, plugin, data)
                except Exception as err:
                    if not is_disk_full(err):
                        raise
            if hook != "event":  # (no loop: an event observer's failure is only stored)
                self._notify("event", round=kwargs.get("round"), phase=kwargs.get("phase"),
                             level="warning", message=message, data=data)

    def _progress(self, r, phase, done, total, metrics):
        self.interrupts.check()
        self._notify("progress", round=r, phase=phase, done=done, total=total, metrics=metrics)
        now = time.monotonic()
        if now - self._last_progress_write >= self._progress_interval or (total and done >= total):
            self._last_progress_write = now
            self.store.progress(r, phase, done, total)

    def _emit(self, r, phase, level, message, data=None, *, plugin=None, store=True):
        if store and self.store is not None:
            self.store.add_event(r, phase, level, message, plugin, data)
        self._notify("event", round=r, phase=phase, level=level, message=message,
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
            with self.store.batch(db) as rows:
                for p in prompts:
                    rows.prompt(p, ctx.round)
            self.store.put_metrics(db, ctx.round, {"prompts/proposed": len(prompts)}, "runner", "propose")

        return write

    def _do_optimise(self, ctx: Context) -> Callable:
        prompts = [p for p in self.store.load_prompts(ctx.round, generate_only=False)
                   if p.kind != "rewrite"]
        system = None
        deployed = None  # the system prompt evaluators use: the last one deployed
        new: list[c.Prompt] = []
        instructions: list[c.Instruction] = []
        decisions: list[c.RewriteDecision] = []
        metrics: dict[str, float] = {}
        for opt in self.comps.optimisers:
            ctx.system = system
            res = self._call(opt, "optimise", ctx, prompts)
            prompts = res.prompts
            if res.system is not None:
                system = res.system
                deployed = res.system if res.deploy else None
            new.extend(res.new_prompts)
            for ins in res.instructions:
                ins.optimiser = opt.label
            instructions.extend(res.instructions)
            for d in res.decisions:
                d.optimiser = opt.label
            decisions.extend(res.decisions)
            metrics.update(res.metrics)

        def write(db):
            with self.store.batch(db) as rows:
                for p in new:
                    if p.id is None:
                        p.source = p.source or "optimiser"
                        rows.prompt(p, ctx.round)
                for i, p in enumerate(prompts):
                    if p.id is None:
                        rows.prompt(p, ctx.round)
                    rows.round_prompt(ctx.round, i, p.id, system or p.system)
                for ins in instructions:
                    rows.instruction(ins, ctx.round)
                for d in decisions:
                    for p in (d.prompt, d.rewrite):
                        if p.id is None:
                            rows.prompt(p, ctx.round)
                    rows.decision(d, ctx.round)
            db.execute("update rounds set system = ? where round = ?", [deployed, ctx.round])
            self.store.put_metrics(db, ctx.round, metrics, "optimisers", "optimise")

        return write

    def _do_generate(self, ctx: Context) -> Callable:
        prompts = self.store.load_prompts(ctx.round)
        heldout.refuse_leaks(prompts, self._heldout, ctx.round)
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
        with blame(self.comps.generator, "in generate()"):
            if len(outs) != len(prompts) or any(len(o) != g.n for o in outs):
                raise ValueError(
                    f"generate() returned {len(outs)} lists for {len(prompts)} prompts "
                    f"(each must hold n={g.n} completions)"
                )
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
            with self.store.batch(db) as rows:
                for cand in cands:
                    rows.candidate(cand, ctx.round)
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
        for index, judge in enumerate(self.comps.judges):
            res = self._call(judge, "judge", ctx, cands + new_cands)
            for j in res.judgments:
                j.judge = judge.label
            if res.outputs:
                metrics[f"judge/{judge.label}/truncated_rate"] = res.truncated / res.outputs
            guards.check_judge(self.config.guards, field=f"judges[{index}]", judge=judge, judgments=res.judgments,
                               outputs=res.outputs, truncated=res.truncated, round=ctx.round,
                               run_dir=self.run_dir, truncated_sample=res.truncated_sample)
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
            with self.store.batch(db) as rows:
                for cand in new_cands:
                    cand.policy = cand.policy or ctx.policy_label
                    rows.candidate(cand, ctx.round)
                for j in judgments:
                    rows.judgment(j, ctx.round)
                for p in offered:
                    rows.pair(p, ctx.round, selected=False)
            self.store.put_metrics(db, ctx.round, metrics, "judges", "judge")

        return write

    def combined_scores(self, r: int) -> dict[int, float]:
        """Per eligible candidate, the judges' scores combined by ``[selection] combine``
        (loop/combine.py: per-judge means, normalised, weighted; candidates missing a
        judge of their prompt's panel are left out)."""
        return self._combined(r)[0]

    def _combined(self, r: int) -> tuple[dict[int, float], set[int]]:
        rows = self.store.rows(
            "select j.candidate_id, c.prompt_id, j.judge, j.score from judgments j "
            "join candidates c on c.id = j.candidate_id where j.round = ?", [r])
        return combine([(x["candidate_id"], x["prompt_id"], x["judge"], x["score"]) for x in rows],
                       self.comps.weights, self.config.selection.combine)

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
        scores, ineligible = self._combined(ctx.round)
        selector = self.comps.selector_for(ctx.round)
        sel = self._call(selector, "select", ctx, cands, scores, offered)
        guards.check_selection(self.config.guards, selector=selector, examples=len(sel),
                               candidates=len(cands), scored=len(scores), round=ctx.round,
                               run_dir=self.run_dir)
        metrics = dict(sel.metrics)
        metrics["select/ineligible"] = float(len(ineligible))
        metrics.setdefault("select/pairs", len(sel.pairs))
        metrics.setdefault("select/selected", len(sel.selected))
        metrics["select/examples"] = len(sel)
        if sel.pairs:
            chosen = [p.chosen.num_tokens or 0 for p in sel.pairs]
            rejected = [p.rejected.num_tokens or 0 for p in sel.pairs]
            metrics["select/chosen_tokens"] = sum(chosen) / len(chosen)
            metrics["select/rejected_tokens"] = sum(rejected) / len(rejected)
        metrics.update(judge_quality.selection_figures(sel.pairs, cands, scores))

        def write(db):
            with self.store.batch(db) as rows:
                for p in sel.pairs:
                    rows.pair(p, ctx.round, selected=True)
                for s in sel.selected:
                    rows.selected(s, ctx.round)
            self.store.put_metrics(db, ctx.round, metrics, selector.label, "select")

        return write

    def load_selection(self, r: int) -> c.Selection:
        return load_selection(self.store, r)

    def _do_update(self, ctx: Context) -> Callable:
        from loop.model_card import write_model_card
        from loop.policy import install_adapter

        updater = self.comps.updater_for(ctx.round)
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
            with blame(gen, "in release()"):
                gen.release(ctx)
            try:
                if getattr(updater.options, "launch", None) is not None:
                    from loop.launch import run_launched  # accelerate launch, loop/launch.py

                    result = run_launched(self, ctx, updater, str(tmp))
                else:
                    result = self._call(updater, "update", ctx, selection, str(tmp))
            finally:
                with blame(gen, "in reclaim()"):
                    gen.reclaim(ctx)
            with blame(updater, "installing the adapter it wrote"):
                _check_losses(result, updater, self.run_dir)
                options = updater.options.model_dump(mode="json") if updater.options is not None else {}
                write_model_card(tmp, self.store, ctx.round, self.model_path, result,
                                 init_from=Path(ctx.adapter).name if ctx.adapter else None,
                                 updater={"name": updater.name, **options})
                install_adapter(str(tmp), str(final))
            policy, adapter_rel = f"round-{ctx.round}", str(final.relative_to(self.run_dir))
            files = integrity.hash_folder(final)
        metrics = dict(result.metrics)
        metrics["train/steps"] = len(result.steps)

        def write(db):
            with self.store.batch(db) as rows:
                for step in result.steps:
                    rows.train_step(step, ctx.round)
            self.store.put_metrics(db, ctx.round, metrics, updater.label, "update")
            db.execute("update rounds set policy = ?, adapter = ?, reference = ? where round = ?",
                       [policy, adapter_rel, result.reference, ctx.round])
            if len(selection):
                integrity.record_adapter(db, ctx.round, adapter_rel, files)

        return write

    def _do_evaluate(self, ctx: Context) -> Callable:
        metrics: dict[str, float] = {}
        for ev in self.comps.evaluators:
            out = self._call(ev, "evaluate", ctx)
            with blame(ev, "in evaluate()"):
                bad = [k for k in out if "/" not in k]
                if bad:
                    raise ValueError(f"metric names must be group/name, got {bad}")
            metrics.update(out)

        def write(db):
            self.store.put_metrics(db, ctx.round, metrics, "evaluators", "evaluate")

        return write


def load_selection(store: Store, r: int) -> c.Selection:
    """Round ``r``'s stored selection (its pairs and selected candidates), as the update
    phase gets it (also read by a launched update, loop/launch.py)."""
    prompts = {p.id: p for p in store.load_prompts(r, generate_only=False)}
    cands = store.load_candidates(r, prompts)
    by_id = {x.id: x for x in cands}
    pairs = [
        c.Pair(prompt=prompts[row["prompt_id"]], chosen=by_id[row["chosen_id"]],
               rejected=by_id[row["rejected_id"]], chosen_score=row["chosen_score"],
               rejected_score=row["rejected_score"], source=row["source"], id=row["id"])
        for row in store.rows("select * from pairs where round = ? and selected = 1 order by id", [r])
    ]
    selected = [
        c.Selected(candidate=by_id[row["candidate_id"]], score=row["score"], rank=row["rank"],
                   label=row["label"], group=row["group_key"], id=row["id"])
        for row in store.selected(r)
    ]
    return c.Selection(pairs=pairs, selected=selected)


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
          replace: bool = False, version: str = "0", build_progress=None) -> Runner:
    """Validate, create the run folder and return a Runner (not yet running).

    ``build_progress(done, total, **metrics)`` follows a model builder's work."""
    config, comps = prepare(config_path, overrides, data=data, extra_plugins=extra_plugins)
    # Before the model: a builder may take minutes, and it writes its cache under runs_dir.
    check_runs_dir(config)
    _refuse_existing(config, replace)
    model_path = resolve_model_path(config, comps, progress=build_progress)
    try:
        run_dir = create_run(config, comps, model_path, version, replace=replace)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full(Path(config.runs_dir), f"creating the run folder {config.name}",
                        "run the command again (nothing was created)") from e
    return Runner(run_dir, config, comps, model_path, resumed=False)



def resume(run_dir: str | Path, extra_plugins=(), overrides: list[str] = (),
           redo: str | None = None, build_progress=None) -> Runner:
    """Continue a run (the caller runs the returned Runner); see ``loop.runs.reopen_run``:
    the lock is taken first, the database's config is the authority, ``overrides``
    (``--set``) and ``redo`` (``round-N.PHASE``) are applied once everything is valid."""
    try:
        run_dir, config, comps, model_path, lock = reopen_run(
            run_dir, extra_plugins=extra_plugins, overrides=overrides, redo=redo,
            build_progress=build_progress)
    except Exception as e:
        if not is_disk_full(e) or isinstance(e, DiskFull):
            raise
        raise disk_full(Path(run_dir), "reopening the run",
                        f"`selfloop resume {run_dir}` again (nothing was changed)") from e
    return Runner(run_dir, config, comps, model_path, resumed=True, lock=lock)
