"""Creating, validating and reopening a run folder.

``prepare`` validates a config completely (components, options) before anything is
written; ``resolve_model_path`` finds or builds the base model; ``create_run`` makes
``<runs_dir>/<name>`` atomically (built in a temp folder, then renamed), with the
resolved config saved in ``config.json`` and in the database. ``loop.runner`` runs it.
``reopen_run`` (for ``resume``) takes the run's lock first, validates everything from the
database's copy of the config (loop/integrity.py), and only then applies ``--redo`` and
``--set``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loop import components as c
from loop import integrity, plugins
from loop.config import RunConfig, config_from_dict, load_config
from loop.errors import ConfigError, UserError
from loop.integrity import CONFIG_FILE, DB_FILE
from loop.lock import RunLock
from loop.store import Store


@dataclass
class Stage:
    """Rounds ``first``..``last`` are trained by ``updater`` on ``selector``'s output."""

    first: int
    last: int
    updater: c.Updater
    selector: c.Selector


@dataclass
class Components:
    generator: c.Generator
    prompt_sources: list[c.PromptSource]
    optimisers: list[c.PromptOptimiser]
    judges: list[c.Judge]
    weights: dict[str, float]
    selector: c.Selector
    updater: c.Updater
    evaluators: list[c.Evaluator]
    model_builder: c.ModelBuilder | None = None
    stages: list[Stage] | None = None  # [[stages]]; None: one updater and selector throughout
    observers: list[c.Observer] = field(default_factory=list)

    def stage(self, r: int) -> Stage | None:
        for s in self.stages or ():
            if s.first <= r <= s.last:
                return s
        return None

    def updater_for(self, r: int) -> c.Updater:
        s = self.stage(r)
        return s.updater if s is not None else self.updater

    def selector_for(self, r: int) -> c.Selector:
        s = self.stage(r)
        return s.selector if s is not None else self.selector

    def all(self) -> list[c.Component]:
        out = [self.generator, *self.prompt_sources, *self.optimisers, *self.judges,
               self.selector, self.updater, *self.evaluators, *self.observers]
        for s in self.stages or ():
            out += [x for x in (s.updater, s.selector) if all(x is not y for y in out)]
        return out



# ---------------------------------------------------------------------------
# Preparing a run: everything is validated before the run folder exists
# ---------------------------------------------------------------------------


def build_components(config: RunConfig) -> Components:
    file = config.source_file
    for p in config.plugins:
        try:
            plugins.load_plugin_file(p, base=config.source_dir)
        except UserError as e:
            raise ConfigError(str(e), file=file, field="plugins") from None
    build = functools.partial(plugins.build_component, source_dir=config.source_dir)
    judges = [
        build("judge", spec, f"judges[{i}]", file, label=spec.label or spec.name)
        for i, spec in enumerate(config.judges)
    ]
    updater = (build("updater", config.updater, "updater", file) if config.updater is not None
               else None)
    selector = build("selector", config.selector, "selector", file)
    stages, first = [], 1
    for i, spec in enumerate(config.stages):
        st_updater = (build("updater", spec.updater, f"stages[{i}].updater", file)
                      if spec.updater is not None else updater)
        st_selector = (build("selector", spec.selector, f"stages[{i}].selector", file)
                       if spec.selector is not None else selector)
        stages.append(Stage(first, first + spec.rounds - 1, st_updater, st_selector))
        first += spec.rounds
    ranks = {s.updater.lora_rank() for s in stages} - {None}
    if len(ranks) > 1:
        raise ConfigError(
            f"the stages' updaters train LoRA ranks {sorted(ranks)}, but each round continues "
            "the previous adapter; give every stage the same lora_r", file=file, field="stages")
    return Components(
        generator=build("generator", config.generator, "generator", file),
        prompt_sources=[
            build("prompt_source", s, f"prompts[{i}]", file) for i, s in enumerate(config.prompts)
        ],
        optimisers=[
            build("prompt_optimiser", s, f"optimisers[{i}]", file)
            for i, s in enumerate(config.optimisers)
        ],
        judges=judges,
        weights={j.label: spec.weight for j, spec in zip(judges, config.judges)},
        selector=selector,
        updater=updater if updater is not None else stages[0].updater,
        evaluators=[
            build("evaluator", s, f"evaluators[{i}]", file, label=s.label or s.name)
            for i, s in enumerate(config.evaluators)
        ],
        model_builder=(
            build("model_builder", config.model.build, "model.build", file)
            if config.model.build is not None
            else None
        ),
        stages=stages or None,
        observers=[
            build("observer", s, f"observers[{i}]", file) for i, s in enumerate(config.observers)
        ],
    )


def resolve_model_path(config: RunConfig, comps: Components, progress=None) -> str:
    """The base model folder: a local folder, a cached hub snapshot, or a builder's output;
    checked (loop/model_check.py) before anything is written.

    ``progress(done, total, **metrics)`` follows a builder's work (the dashboard's "model"
    row), for builders whose ``build`` takes a ``progress`` argument.
    """
    path = _find_model(config, comps, progress)
    from loop.model_check import check_model_folder
    from loop.policy import resolve_device

    check_model_folder(path, config, comps.generator, resolve_device(config.model.device))
    return path


def _find_model(config: RunConfig, comps: Components, progress=None) -> str:
    from loop.model_check import looks_like_hub_id

    if comps.model_builder is not None:
        cache = Path(config.runs_dir).resolve() / ".cache"
        cache.mkdir(parents=True, exist_ok=True)
        builder = comps.model_builder
        kwargs = {}
        if progress is not None and "progress" in inspect.signature(builder.build).parameters:
            kwargs["progress"] = progress
        # Absolute: runs.model_path must still point at it when resumed from another folder.
        return str(Path(builder.build(str(cache), **kwargs)).resolve())
    raw = config.model.path
    p = Path(raw).expanduser()
    if not p.is_absolute() and config.source_dir is not None and (config.source_dir / p).exists():
        p = config.source_dir / p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"folder {str(p)!r} has no config.json; give a Hugging Face model folder",
                file=config.source_file, field="model.path",
            )
        return str(p.resolve())
    if p.exists():
        raise ConfigError(f"{raw!r} is a file; give a model folder", file=config.source_file, field="model.path")
    if not looks_like_hub_id(raw):
        raise ConfigError(
            f"folder {raw!r} not found (looked at {p.resolve()}); fix the path (relative paths "
            "are taken from the config file's folder or the current one)",
            file=config.source_file, field="model.path",
        )
    # A hub name: only a copy already in the local cache (runs never download).
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(raw, local_files_only=True)
    except Exception:
        raise ConfigError(
            f"{raw!r} is neither a local folder nor a hub model in the local cache; fix the "
            f"path, or download it first (`hf download {raw}`)",
            file=config.source_file, field="model.path",
        ) from None


def prepare(config_path: str | None, overrides: list[str] = (), data: dict | None = None,
            extra_plugins: list[str] = ()) -> tuple[RunConfig, Components]:
    """Load and validate a config with its components. Writes nothing."""
    config = load_config(config_path, overrides, data=data)
    for p in extra_plugins:
        plugins.load_plugin_file(p)
    # Plugin paths are stored absolute so `resume` finds them from anywhere.
    config.plugins = [str((config.source_dir / p).resolve()) if not Path(p).is_absolute() else p
                      for p in config.plugins]
    comps = build_components(config)
    from loop import heldout
    from loop.model_check import resolve_chat_template

    heldout.validate(config, comps)
    resolve_chat_template(config)
    return config, comps


def resolved_config(config: RunConfig, comps: Components) -> dict:
    """The config with every component's options filled in with their defaults."""
    data = config.dump()

    def full(spec: dict, comp: c.Component) -> dict:
        out = {"name": spec["name"]}
        for k in ("weight", "label"):  # (judges' weight and label; evaluators' label)
            if k in spec:
                out[k] = spec[k]
        out.update(comp.options.model_dump(mode="json"))
        return out

    data["generator"] = full(data["generator"], comps.generator)
    data["prompts"] = [full(s, x) for s, x in zip(data["prompts"], comps.prompt_sources)]
    data["optimisers"] = [full(s, x) for s, x in zip(data["optimisers"], comps.optimisers)]
    data["judges"] = [full(s, x) for s, x in zip(data["judges"], comps.judges)]
    data["selector"] = full(data["selector"], comps.selector)
    if data["updater"] is not None:
        data["updater"] = full(data["updater"], comps.updater)
    for spec, stage in zip(data["stages"], comps.stages or ()):
        if spec["updater"] is not None:
            spec["updater"] = full(spec["updater"], stage.updater)
        if spec["selector"] is not None:
            spec["selector"] = full(spec["selector"], stage.selector)
    data["evaluators"] = [full(s, x) for s, x in zip(data["evaluators"], comps.evaluators)]
    data["observers"] = [full(s, x) for s, x in zip(data["observers"], comps.observers)]
    if comps.model_builder is not None:
        data["model"]["build"] = full(data["model"]["build"], comps.model_builder)
    return data


def create_run(config: RunConfig, comps: Components, model_path: str, version: str,
               replace: bool = False) -> Path:
    """Make ``<runs_dir>/<name>`` atomically: built in a temp folder, then renamed."""
    run_dir = config.run_dir
    if run_dir.exists():
        _refuse_existing(config, replace)
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir.parent / f".{config.name}.creating-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        data = resolved_config(config, comps)
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        store = Store.open(tmp / DB_FILE)
        store.init_run(config.name, data, config.seed, config.rounds, version, model_path)
        store.close()
        (tmp / "adapters").mkdir()
        try:
            os.rename(tmp, run_dir)
        except OSError:
            raise UserError(
                f"{run_dir} was created by another process just now: `selfloop resume "
                f"{run_dir}` continues it, or choose another name (--set name=NEW)"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir


def check_runs_dir(config: RunConfig) -> None:
    """``runs_dir`` (or a folder above it) must not be a file: found before the model is built."""
    p = Path(config.runs_dir).expanduser()
    for folder in (p, *p.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(
                    f"{str(folder)!r} is a file, not a folder; set runs_dir to a folder "
                    "(it is created if missing)", file=config.source_file, field="runs_dir",
                )
            return


def _refuse_existing(config: RunConfig, replace: bool) -> None:
    if config.run_dir.exists() and not replace:
        raise UserError(
            f"{config.run_dir} already exists: `selfloop resume {config.run_dir}` continues it, "
            "or choose another name (--set name=NEW)"
        )


def require_run_folder(run_dir: Path) -> None:
    if not (Path(run_dir) / DB_FILE).is_file():
        raise UserError(
            f"{run_dir}: not a selfloop run folder (no {DB_FILE}); give the folder "
            "`selfloop run` made, e.g. runs/NAME"
        )


def load_run_config(run_dir: Path) -> RunConfig:
    """A run's config as its database stores it (the authority; config.json is a copy)."""
    run_dir = Path(run_dir)
    require_run_folder(run_dir)
    store = Store.open_readonly(run_dir / DB_FILE)
    try:
        row = store.run_row() or {}
    finally:
        store.close()
    data = json.loads(row.get("config") or "{}")
    return config_from_dict(data, source_dir=run_dir, label=str(run_dir / CONFIG_FILE))


# Fields a resume may not change: they define which run this is.
FROZEN_ON_RESUME = ("name", "seed", "model", "runs_dir")



def _override_saved(run_dir: Path, data: dict, overrides: list[str]) -> RunConfig:
    """The stored config ``data`` with ``--set`` overrides applied and validated."""
    from loop.config import parse_override

    label = str(run_dir / CONFIG_FILE)
    for text in overrides:
        keys, _ = parse_override(text)
        if keys[0] in FROZEN_ON_RESUME:
            raise ConfigError(
                f"--set {text}: {keys[0]} cannot change on resume (it defines the run); "
                "start a new run with `selfloop run` instead", file=label, field=str(keys[0]),
            )
    data = json.loads(json.dumps(data))  # a copy: the caller's stays as stored
    return load_config(label, overrides, data=data).model_copy(
        update={"source_dir": run_dir, "source_file": label})


# ---------------------------------------------------------------------------
# Reopening a run (resume): the lock first, then validation, then changes
# ---------------------------------------------------------------------------


def reopen_run(run_dir: str | Path, extra_plugins=(), overrides: list[str] = (),
               redo: str | None = None, build_progress=None) -> tuple:
    """Reopen a run folder for ``loop.runner.resume``: (run_dir, config, components,
    model_path, the held RunLock).

    The run's lock is taken first, so a refused resume changes nothing. The database's
    copy of the config is the authority (a differing config.json is refused, see
    loop/integrity.py). ``overrides`` (``--set``) may change options for the phases still
    to run (say, a judge's max_new_tokens after a failure); the change is saved in
    config.json and the runs table, and logged as an event. ``redo`` (``round-N.PHASE``)
    discards that phase and everything after it first, so they run again.
    """
    run_dir = Path(run_dir)
    require_run_folder(run_dir)
    if redo is not None:
        integrity.parse_redo(redo)  # a typo is refused before anything is touched
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        return _resume_locked(run_dir, lock, list(extra_plugins), list(overrides), redo,
                              build_progress)
    except BaseException:
        lock.release()
        raise


def _resume_locked(run_dir: Path, lock: RunLock, extra_plugins: list[str],
                   overrides: list[str], redo: str | None, build_progress=None) -> tuple:
    integrity.check_database(run_dir / DB_FILE)
    reader = Store.open_readonly(run_dir / DB_FILE)  # nothing is written until all is valid
    try:
        row = reader.run_row()
    finally:
        reader.close()
    if row is None:
        raise integrity.DamagedFile(
            f"{run_dir / DB_FILE}: holds no run (the runs table is empty); it cannot be resumed, "
            "start it again with `selfloop run`"
        )
    data, missing = integrity.authoritative_config(run_dir, row["config"])
    label = str(run_dir / CONFIG_FILE)
    config = config_from_dict(data, source_dir=run_dir, label=label)
    if overrides:
        config = _override_saved(run_dir, data, overrides)
    # The saved runs_dir may be relative to where the run started; the run folder's parent
    # is where it is now (the model cache lives there too), whatever the current folder.
    config.runs_dir = str(run_dir.resolve().parent)
    for p in extra_plugins:
        plugins.load_plugin_file(p)
    comps = build_components(config)
    model_path = row.get("model_path")
    if not model_path or not Path(model_path).exists():
        model_path = resolve_model_path(config, comps, progress=build_progress)
    # Everything is validated: from here on the run is changed.
    writer = Store.open(run_dir / DB_FILE)
    try:
        _apply_resume_changes(run_dir, writer, missing, redo, overrides, config, comps)
    finally:
        writer.close()
    return run_dir, config, comps, model_path, lock


def _apply_resume_changes(run_dir, writer, missing, redo, overrides, config, comps) -> None:
    if missing:
        integrity.write_config_file(run_dir, json.loads(writer.run_row()["config"]))
        writer.add_event(None, None, "info", f"{CONFIG_FILE} was missing: written again from the database")
    if redo is not None:
        writer.add_event(None, None, "info", integrity.redo(writer, run_dir, redo), data={"redo": redo})
    if overrides:
        new = resolved_config(config, comps)
        with writer.transaction() as db:
            db.execute("update runs set config = ? where id = 1", [json.dumps(new, sort_keys=True)])
        integrity.write_config_file(run_dir, new)
        writer.add_event(None, None, "info", "config changed on resume: " + ", ".join(overrides),
                         data={"overrides": list(overrides)})
