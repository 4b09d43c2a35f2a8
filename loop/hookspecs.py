"""The plugin contract: every hook selfloop calls, in one file.

Two kinds of hooks:

- Registration hooks (``register_*``) are called once when the plugin manager starts.
  Each gets a ``register`` callback; call it with a component class (a subclass of
  ``loop.Judge``, ``loop.Generator``, ...). The core owns the names: two plugins
  registering the same name for the same kind is a start-up error naming both.
- Lifecycle hooks (``run_start`` ... ``progress``) are called as a run goes. They are for
  observers (the dashboard, loggers, custom metrics); their return values are ignored.
  Each implementation is called on its own: one that raises (``SystemExit`` included)
  is logged as a warning event naming its plugin and never stops the run.

A plugin implements hooks with ``@loop.hookimpl``. A hookimpl whose name matches no hook
here is an error at start-up.
"""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("selfloop")
hookimpl = HookimplMarker("selfloop")


# -- registration ------------------------------------------------------------------


@hookspec
def register_generators(register):
    """Register generator classes (``loop.Generator`` subclasses).

    Called once at start-up. ``register(cls)`` records ``cls`` under ``cls.name``.
    Returns nothing.
    """


@hookspec
def register_prompt_sources(register):
    """Register prompt source classes (``loop.PromptSource``): the propose phase.

    Called once at start-up. ``register(cls)`` records ``cls`` under ``cls.name``.
    """


@hookspec
def register_prompt_optimisers(register):
    """Register prompt optimiser classes (``loop.PromptOptimiser``): the optimise phase.

    Called once at start-up. ``register(cls)`` records ``cls`` under ``cls.name``.
    """


@hookspec
def register_judges(register):
    """Register judge classes (``loop.Judge``): the judge phase.

    Called once at start-up. ``register(cls)`` records ``cls`` under ``cls.name``.
    """


@hookspec
def register_selectors(register):
    """Register selector classes (``loop.Selector``): the select phase.

    Called once at start-up. ``register(cls)`` records ``cls`` under ``cls.name``.
    """


@hookspec
def register_updaters(register):
    """Register updater classes (``loop.Updater``): the update phase.

    Called once at start-up. ``register(cls)`` records ``cls`` under ``cls.name``.
    """


@hookspec
def register_evaluators(register):
    """Register evaluator classes (``loop.Evaluator``): the evaluate phase.

    Called once at start-up. ``register(cls)`` records ``cls`` under ``cls.name``.
    """


@hookspec
def register_model_builders(register):
    """Register model builder classes (``loop.ModelBuilder``).

    A builder makes a model folder on demand, for a config's ``[model] build = NAME``
    (the embedded tiny model is one). Called once at start-up.
    """


@hookspec
def register_observers(register):
    """Register observer classes (``loop.Observer``): experiment trackers, loggers.

    Called once at start-up. ``register(cls)`` records ``cls`` under ``cls.name``; a
    config enables one with ``[[observers]] name = "..."``. The runner calls an enabled
    observer's lifecycle methods through a guard: one that raises is switched off and
    logged as an event, and the run goes on.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``selfloop`` command line.

    ``cli`` is the top-level ``click.Group``; decorate new functions with
    ``@cli.command()``. Called once when the command line starts.
    """


# -- lifecycle ---------------------------------------------------------------------


@hookspec
def run_start(run):
    """A run starts or resumes, before its first phase.

    ``run`` is the ``loop.runner.RunInfo``: ``name``, ``run_dir``, ``config``,
    ``rounds`` (total), ``resumed`` (bool) and ``store`` (read access). Return value
    ignored.
    """


@hookspec
def run_end(run, status):
    """A run stops. ``status`` is "completed", "interrupted" or "failed".

    Called also when a phase failed or Ctrl-C stopped the run. Return value ignored.
    """


@hookspec
def round_start(run, round):
    """A round starts (``round`` 0 is the evaluation of the starting policy).

    Called before the round's first phase that is not already done. Return ignored.
    """


@hookspec
def round_end(run, round, metrics):
    """A round's last phase is done. ``metrics`` maps ``group/name`` to the round's values.

    Return value ignored.
    """


@hookspec
def phase_start(run, round, phase):
    """A phase starts: ``phase`` is one of ``loop.runner.PHASES``. Return value ignored.

    The round protocol. Round 0 runs only ``evaluate`` (the starting policy). Rounds
    1..N run these phases in order; each reads what earlier phases stored and writes its
    results and its done-mark in one transaction:

    1. propose  - prompt sources add this round's prompts.
    2. optimise - prompt optimisers may rewrite prompts or set a system instruction
                  (originals are kept; rewrites point to them).
    3. generate - the generator samples N candidates per prompt from the policy.
    4. judge    - judges run in config order; each scores every candidate so far (raw
                  text kept; unparseable output is a recorded failure) and may add
                  revisions (seen by the judges after it) and offer pairs; the runner
                  stores each judge's scores and quality figures under its label.
    5. select   - the selector turns scores into pairs or selected sets.
    6. update   - the updater trains the next adapter from the previous one (the
                  generator releases the accelerator first and reclaims it after).
    7. evaluate - evaluators record metrics for the new policy.

    A resumed run skips done phases and re-runs an interrupted one from scratch with
    the same seed (derived from the run seed, the round and the phase).
    """


@hookspec
def phase_end(run, round, phase, status, seconds):
    """A phase ends. ``status`` is "done", "failed" or "interrupted".

    Phases already done when a run resumes are skipped without phase_start/phase_end.

    ``seconds`` is its wall time. Return value ignored.
    """


@hookspec
def progress(run, round, phase, done, total, metrics):
    """A component reports progress inside a phase (a batch generated, a step trained).

    ``done`` and ``total`` count the phase's units (``total`` may be None);
    ``metrics`` is a dict of ``group/name`` -> float (may be empty). Called often: keep
    it cheap. Return value ignored.
    """


@hookspec
def event(run, round, phase, level, message, data):
    """Something worth a line happened (a warning, a resume, a failure's summary).

    ``level`` is "info", "warning" or "error"; ``data`` a JSON-able dict. Events are
    stored in the ``events`` table too. Return value ignored.
    """
