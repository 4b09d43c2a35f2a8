"""Plugin loading: built-ins, installed plugins (entry points), single files.

- Built-in components live under ``plugins/`` and register through the same hooks a
  third-party plugin uses (``BUILTINS`` below).
- Installed plugins are loaded from the entry-point group ``selfloop``. If
  ``SELFLOOP_LOAD_PLUGINS`` is set (comma-separated entry-point or distribution names),
  only those are loaded; set it to an empty string to load none.
- A single file loads with ``--plugin path/to/file.py`` or ``plugins = [...]`` in a config.
- ``SELFLOOP_TRACE_PLUGINS=1`` prints every hook call and its result to stderr.

Nothing is loaded at import time: ``get_manager()`` builds the manager on first use.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pluggy
from pydantic import ValidationError

from loop import hookspecs
from loop.components import KINDS, Component
from loop.errors import ConfigError, PluginError

BUILTINS = (
    "plugins.generators.hf",
    "plugins.generators.vllm",
    "plugins.generators.vllm_server",
    "plugins.judges.self_reward",
    "plugins.judges.constitutional",
    "plugins.judges.reward_model",
    "plugins.judges.remote",
    "plugins.judges.verify",
    "plugins.judges.trained_rm",
    "plugins.prompts.dataset",
    "plugins.prompts.self_instruct",
    "plugins.prompts.opro",
    "plugins.prompts.bpo",
    "plugins.selectors.pairs",
    "plugins.selectors.top_k",
    "plugins.selectors.ranked",
    "plugins.selectors.spin",
    "plugins.updaters.dpo",
    "plugins.updaters.orpo",
    "plugins.updaters.raft",
    "plugins.updaters.ranked",
    "plugins.updaters.kto",
    "plugins.updaters.sft",
    "plugins.updaters.grpo",
    "plugins.updaters.ppo",
    "plugins.evaluators.verify",
    "plugins.evaluators.winrate",
    "plugins.tinyworld",
    "plugins.observers",
)

# Registration hook -> component kind it registers.
REGISTRATION_HOOKS = {
    "register_generators": "generator",
    "register_prompt_sources": "prompt_source",
    "register_prompt_optimisers": "prompt_optimiser",
    "register_judges": "judge",
    "register_selectors": "selector",
    "register_updaters": "updater",
    "register_evaluators": "evaluator",
    "register_model_builders": "model_builder",
    "register_observers": "observer",
}

_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None


@dataclass
class Registry:
    """Every registered component class, by kind and name, with the plugin that gave it."""

    components: dict[str, dict[str, type[Component]]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )

    def add(self, kind: str, cls: type, plugin: str) -> None:
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"plugin {plugin}: register() for {kind}s takes a subclass of "
                f"loop.{base.__name__}, got {cls!r}"
            )
        if not cls.name:
            raise PluginError(f"plugin {plugin}: {cls.__name__} has no `name`")
        existing = self.components[kind].get(cls.name)
        if existing is not None and existing is not cls:
            raise PluginError(
                f"two plugins register a {kind} named {cls.name!r}: {existing.plugin} "
                f"({existing.__module__}.{existing.__qualname__}) and {plugin} "
                f"({cls.__module__}.{cls.__qualname__}); uninstall one, or drop it from "
                "SELFLOOP_LOAD_PLUGINS"
            )
        cls.plugin = plugin
        self.components[kind][cls.name] = cls

    def get(self, kind: str, name: str, field_name: str, file: str | None = None) -> type[Component]:
        try:
            return self.components[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.components[kind])) or "none"
            raise ConfigError(
                f"unknown {kind.replace('_', ' ')} {name!r}; installed: {known} "
                "(`selfloop plugins` lists them; a plugin file loads with --plugin)",
                file=file,
                field=field_name,
            ) from None


def _trace(hook_name, hook_impls, kwargs):
    names = ", ".join(i.plugin_name for i in hook_impls)
    args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
    print(f"[selfloop plugin trace] {hook_name}({args}) -> [{names}]", file=sys.stderr)


def _trace_after(outcome, hook_name, hook_impls, kwargs):
    try:
        result = outcome.get_result()
    except BaseException as e:  # noqa: BLE001 - we only print it
        result = f"raised {e!r}"
    print(f"[selfloop plugin trace] {hook_name} returned {_short(result)}", file=sys.stderr)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) < 80 else s[:77] + "..."


def get_manager() -> pluggy.PluginManager:
    """The process's plugin manager: built-ins plus allowed installed plugins."""
    global _manager
    if _manager is not None:
        return _manager
    _manager = _build(BUILTINS)
    return _manager


def _build(builtins: tuple[str, ...]) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("selfloop")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("SELFLOOP_TRACE_PLUGINS"):
        pm.add_hookcall_monitoring(_trace, _trace_after)
    for module_name in builtins:
        pm.register(importlib.import_module(module_name), name=module_name)
    _load_entry_points(pm)
    _check(pm)
    return pm


# The built-ins that implement ``register_commands`` (none today): the only ones loaded
# when the CLI needs its plugin commands before anything else has built the manager, so
# that ``selfloop --help`` does not import torch (tests/test_config.py checks the list).
COMMAND_BUILTINS: tuple[str, ...] = ()


def add_commands(cli) -> None:
    """Call every ``register_commands`` hook with the CLI group. With the manager not built
    yet, a lighter one does it: installed plugins plus ``COMMAND_BUILTINS`` only."""
    pm = _manager if _manager is not None else _build(COMMAND_BUILTINS)
    pm.hook.register_commands(cli=cli)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow = os.environ.get("SELFLOOP_LOAD_PLUGINS")
    allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
    for ep in importlib.metadata.entry_points(group="selfloop"):
        dist = ep.dist.name if ep.dist is not None else None
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        try:
            module = ep.load()
        except Exception as e:  # a broken third-party plugin is the user's to fix
            raise PluginError(f"installed plugin {ep.name!r} ({ep.value}) failed to load: {e}")
        if pm.is_registered(module):
            continue
        pm.register(module, name=ep.name)


def _check(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(
            f"{e}; a hook implementation's name must match a hook in loop/hookspecs.py "
            "(see docs/plugins.md)"
        ) from None


def load_plugin_file(path: str | Path, *, base: Path | None = None) -> str:
    """Load one ``.py`` file as a plugin; returns the name it is registered under."""
    pm = get_manager()
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    p = p.resolve()
    name = f"file:{p}"
    if pm.get_plugin(name) is not None:
        return name
    if not p.is_file():
        raise PluginError(f"plugin file {path}: not found; give the path of a .py file")
    spec = importlib.util.spec_from_file_location(f"selfloop_plugin_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise PluginError(f"plugin file {path}: failed to import: {type(e).__name__}: {e}") from e
    try:
        pm.register(module, name=name)
    except ValueError as e:
        raise PluginError(f"plugin file {path}: {e}") from e
    try:
        _check(pm)
    except PluginError:
        pm.unregister(name=name)
        raise
    _reset_registry()
    return name


def register(plugin: object, name: str | None = None) -> str:
    """Register a plugin object or module (tests, embedding). Returns its name."""
    pm = get_manager()
    registered = pm.register(plugin, name=name)
    try:
        _check(pm)
    except PluginError:
        pm.unregister(plugin)
        raise
    _reset_registry()
    return registered


def unregister(plugin: object = None, name: str | None = None) -> None:
    get_manager().unregister(plugin=plugin, name=name)
    _reset_registry()


def _reset_registry() -> None:
    global _registry
    _registry = None


def registry() -> Registry:
    """Call every registration hook once; refuse duplicate names, naming both plugins."""
    global _registry
    if _registry is not None:
        return _registry
    pm = get_manager()
    reg = Registry()
    for hook_name, kind in REGISTRATION_HOOKS.items():
        caller = getattr(pm.hook, hook_name)
        # Call each implementation ourselves so we know which plugin registers what.
        for impl in reversed(caller.get_hookimpls()):
            def register_one(cls, _kind=kind, _plugin=impl.plugin_name):
                reg.add(_kind, cls, _plugin)

            if os.environ.get("SELFLOOP_TRACE_PLUGINS"):
                print(f"[selfloop plugin trace] {hook_name} -> [{impl.plugin_name}]", file=sys.stderr)
            impl.function(register=register_one)
    _registry = reg
    return reg


def call_each(hook_name: str, kwargs: dict, passthrough: tuple = ()) -> list[tuple[str, BaseException]]:
    """Call every implementation of an observer hook, one at a time, in pluggy's order.

    One that raises (anything but ``passthrough``) does not stop the others: the
    result lists ``(plugin name, exception)`` for each that did, for the runner to log.
    Hook wrappers are not run on observer hooks.
    """
    caller = getattr(get_manager().hook, hook_name)
    failures = []
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        if os.environ.get("SELFLOOP_TRACE_PLUGINS"):
            print(f"[selfloop plugin trace] {hook_name} -> [{impl.plugin_name}]", file=sys.stderr)
        try:
            impl.function(*[kwargs[a] for a in impl.argnames])
        except passthrough:
            raise
        except BaseException as e:  # noqa: BLE001 - SystemExit too: observers never stop a run
            failures.append((impl.plugin_name, e))
    return failures


def plugin_hooks() -> list[dict]:
    """For ``selfloop plugins``: every plugin, its hooks and what it registers."""
    pm = get_manager()
    reg = registry()
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda x: x[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        components = {
            kind: sorted(n for n, c in by_name.items() if c.plugin == name)
            for kind, by_name in reg.components.items()
        }
        out.append(
            {
                "name": name,
                "builtin": name in BUILTINS,
                "hooks": hooks,
                "components": {k: v for k, v in components.items() if v},
            }
        )
    return out


def build_component(kind: str, spec, field_name: str, file: str | None = None,
                    label: str | None = None, source_dir=None):
    """Instantiate the component a config section names, validating its options.

    Options validators get ``info.context["source_dir"]``: the config file's folder, to
    resolve and check relative paths before anything is written.
    """
    cls = registry().get(kind, spec.name, f"{field_name}.name", file)
    try:
        options = cls.Options.model_validate(spec.options(), context={"source_dir": source_dir})
    except ValidationError as e:
        from loop.config import format_validation_error

        sub, message = format_validation_error(e, cls.Options)
        field = field_name if sub == "(top level)" else f"{field_name}.{sub}"
        raise ConfigError(message, file=file, field=field) from None
    except ValueError as e:
        raise ConfigError(str(e), file=file, field=field_name) from None
    return cls(options, label=label)
