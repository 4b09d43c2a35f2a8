"""Prompt templates: jinja2 files under ``prompts/`` (or any path), checked when loaded.

A template is named either by a built-in name (``"self_reward"`` is
``prompts/self_reward.j2``, shipped with selfloop: loop/resources.py) or by a path to a
``.j2`` file, relative to the config file.
Loading checks that the template uses every variable the caller will pass (``required``)
and no other but the ones it may use (``optional``, such as few-shot ``examples``), so a
typo in a template is a start-up error, not a silent empty string.

Templates come from files a user may download, so they are rendered in jinja2's
``ImmutableSandboxedEnvironment``: no attribute starting with ``_`` (the
``__class__.__mro__`` road to ``os.system``), no mutation of the values passed in. A
template that names such an attribute is refused when it is loaded; anything the sandbox
still catches while rendering is a ``UserError`` naming the file.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import AfterValidator, ValidationInfo

from loop.errors import UserError
from loop.resources import shipped


class Template:
    def __init__(self, path: Path, source: str, required: frozenset[str],
                 optional: frozenset[str] = frozenset()):
        self.path = path
        self.source = source
        env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined,
                                            keep_trailing_newline=False)
        try:
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{path}:{e.lineno}: template syntax error: {e.message}") from e
        _refuse_private_names(path, ast)
        used = meta.find_undeclared_variables(ast)
        missing = required - used
        unknown = used - required - optional
        if missing:
            raise UserError(
                f"{path}: template never uses {sorted(missing)}; it must place each of "
                f"{sorted(required)}"
            )
        if unknown:
            raise UserError(
                f"{path}: template uses unknown variables {sorted(unknown)}; "
                f"only {sorted(required | optional)} are passed"
            )
        self.variables = used
        self._template = env.from_string(source)

    def render(self, **values: object) -> str:
        try:
            return self._template.render(**values)
        except SecurityError as e:
            raise UserError(f"{self.path}: the template sandbox refused it: {e} Templates may "
                            "only read the values they are given; remove that expression") from None


def _refuse_private_names(path: Path, ast: nodes.Template) -> None:
    """Refuse ``x.__class__``, ``x['__globals__']`` and ``x|attr('_y')`` at load time."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:
            name = node.args[0].value if (node.name == "attr" and node.args and
                                          isinstance(node.args[0], nodes.Const)) else None
        if isinstance(name, str) and name.startswith("_"):
            raise UserError(
                f"{path}:{node.lineno}: template reaches for the Python internal {name!r}, "
                "which the template sandbox refuses (a road to running code); templates may "
                "only read the values they are given: remove it")


def resolve_template_path(name: str, base: Path | None = None) -> Path:
    candidates = []
    if name.endswith(".j2") or "/" in name:
        p = Path(name).expanduser()
        if not p.is_absolute() and base is not None:
            candidates.append(base / p)
        candidates.append(p)
    else:
        candidates.append(shipped("prompts", f"{name}.j2"))
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise UserError(
        f"template {name!r} not found (looked in {', '.join(str(c) for c in candidates)}); "
        "name a file in prompts/ without .j2, or a path to a .j2 file"
    )


def quote(text: str) -> str:
    """Candidate text made safe to place between ``<<<NAME>>>`` markers: a run of three
    angle brackets is broken up, so the text can never close its own section (a fake
    ``<<<END ANSWER>>>`` followed by a fake score). Judges pass every candidate and
    prompt through it before rendering a template."""
    return text.replace("<<<", "<< <").replace(">>>", "> >>")


@lru_cache(maxsize=64)
def _load(path: Path, mtime: float, required: frozenset[str], optional: frozenset[str]) -> Template:
    return Template(path, path.read_text(encoding="utf-8"), required, optional)


def load_template(name: str, required=frozenset(), base: Path | None = None,
                  optional=frozenset()) -> Template:
    """``required``: variables the template must use; ``optional``: ones it may use (the
    caller passes them either way, see ``Template.variables``)."""
    path = resolve_template_path(name, base)
    return _load(path, path.stat().st_mtime, frozenset(required), frozenset(optional))


def template_option(*required: str, optional: tuple[str, ...] = ()):
    """The type of a component option naming a template that receives ``required``.

    Checked when the config is validated (the file exists, parses, and uses exactly those
    variables), not when the first round reaches it; a path is stored absolute so that a
    resumed run finds it from its run folder::

        class Options(loop.Judge.Options):
            template: template_option("prompt", "response") = "self_reward"
    """
    needed, may = frozenset(required), frozenset(optional)

    def check(value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("source_dir")
        try:
            path = resolve_template_path(value, Path(base) if base is not None else None)
            load_template(str(path), needed, optional=may)
        except UserError as e:
            raise ValueError(str(e)) from None
        builtin = not (value.endswith(".j2") or "/" in value)
        return value if builtin else str(path)

    return Annotated[str, AfterValidator(check)]
