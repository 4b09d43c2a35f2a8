"""What ``selfloop plugins --options NAME`` prints: a component's options, each with its
type (and bounds), its default and the sentence that explains it.

The explanation is the field's ``Field(description=...)``; where a class documents its
fields with comments instead (the comment lines right above a field, or the comment at
the end of its line), those are read from the class's source. A third-party plugin gets
the same help either way.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from loop.errors import UserError

# Options every judge section takes besides the judge's own (loop.config.JudgeSpec).
JUDGE_SPEC_FIELDS = ("weight", "label")


def find_components(name: str) -> list[tuple[str, type]]:
    """``(kind, class)`` for ``NAME`` or ``KIND/NAME`` among the registered components."""
    from loop import plugins

    kind, _, bare = name.rpartition("/")
    reg = plugins.registry().components
    found = [(k, by_name[bare]) for k, by_name in reg.items()
             if bare in by_name and (not kind or k == kind)]
    if not found:
        known = sorted(f"{k}/{n}" for k, by_name in reg.items() for n in by_name)
        raise UserError(f"--options {name}: no such component; known: {', '.join(known)}")
    return found


def option_rows(kind: str, cls: type) -> list[dict[str, Any]]:
    """One dict per option: name, type, default (or "required") and description."""
    rows = [_row(name, field, cls.Options) for name, field in cls.Options.model_fields.items()]
    if kind == "judge":
        from loop.config import JudgeSpec

        rows += [_row(n, JudgeSpec.model_fields[n], JudgeSpec) for n in JUDGE_SPEC_FIELDS]
    return rows


def _row(name: str, field, model: type[BaseModel]) -> dict[str, Any]:
    if field.default is not PydanticUndefined:
        default = field.default
    elif field.default_factory is not None:
        default = field.default_factory()
    else:
        default = "required"
    return {
        "name": name,
        "type": type_name(field.annotation) + _bounds(field.metadata),
        "default": default,
        "description": field.description or comment_for(model, name) or "",
    }


def type_name(annotation) -> str:
    """``int``, ``float | None``, ``"keep" | "teardown"``, ``list[str]``..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else str(origin)
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
           ("min_length", "len >="), ("max_length", "len <="))


def _bounds(metadata: list) -> str:
    parts = []
    for m in metadata:
        for attr, sign in _BOUNDS:
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return f" ({', '.join(parts)})" if parts else ""


def comment_for(model: type, field: str) -> str | None:
    """The comment that documents ``field`` in the source of the class defining it."""
    for klass in model.__mro__:
        if field in klass.__dict__.get("__annotations__", {}):
            return _class_comments(klass).get(field)
    return None


def _class_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # defined dynamically, or no source file
        return {}
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    lines = source.splitlines()
    out = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments
                    and not lines[n - 1].lstrip().startswith("#")]
        above = []
        n = node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(above + trailing).strip()
        if text:
            out[node.target.id] = text
    return out
