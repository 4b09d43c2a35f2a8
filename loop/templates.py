"""Prompt templates: jinja2 files under ``prompts/`` (or any path), checked when loaded.

A template is named either by a built-in name (``"self_reward"`` is
``prompts/self_reward.j2``, shipped with selfloop: loop/resources.py) or by a path to a
``.j2`` file, relative to the config file.
Loading checks that the template uses every variable the caller will pass (``required``)
and no other, so a typo in a template is a start-up error, not a silent empty string.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2 import meta

from loop.errors import UserError
from loop.resources import shipped


class Template:
    def __init__(self, path: Path, source: str, required: frozenset[str]):
        self.path = path
        self.source = source
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        try:
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{path}:{e.lineno}: template syntax error: {e.message}") from e
        used = meta.find_undeclared_variables(ast)
        missing = required - used
        unknown = used - required
        if missing:
            raise UserError(
                f"{path}: template never uses {sorted(missing)}; it must place each of "
                f"{sorted(required)}"
            )
        if unknown:
            raise UserError(
                f"{path}: template uses unknown variables {sorted(unknown)}; "
                f"only {sorted(required)} are passed"
            )
        self.variables = used
        self._template = env.from_string(source)

    def render(self, **values: object) -> str:
        return self._template.render(**values)


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
def _load(path: Path, mtime: float, required: frozenset[str]) -> Template:
    return Template(path, path.read_text(encoding="utf-8"), required)


def load_template(name: str, required=frozenset(), base: Path | None = None) -> Template:
    path = resolve_template_path(name, base)
    return _load(path, path.stat().st_mtime, frozenset(required))
