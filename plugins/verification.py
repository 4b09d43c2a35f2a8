"""Checking an answer against a prompt's reference answer: shared by the ``verify`` judge
and the ``verify`` evaluator (one module, one set of options).

    extract = "exact"         # the whole answer, whitespace collapsed, equals the reference
    extract = "last_number"   # the answer's last number equals the reference's (numerically)
    extract = "boxed"         # the last \\boxed{...} of the answer equals the reference
    extract = "regex"         # with pattern = "Answer: (.*)": the last match (group 1 if any)
    function = "my_pkg.checks:score"   # or a function (prompt, answer, reference) -> [0, 1]

``check`` returns a ``Check``: the score (1.0 / 0.0 from an extraction, or the function's
value), what was extracted, and whether extraction failed (nothing to compare: no number,
no ``\\boxed``, no match). A failed extraction scores 0: the answer is wrong, not unjudged.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Check:
    score: float
    extracted: str | None
    failed: bool  # nothing could be extracted from the answer


def normalise(text: str) -> str:
    """Whitespace collapsed and stripped."""
    return " ".join(text.split())


def last_number(text: str) -> float | None:
    """The last number in ``text`` (``1,234.5`` -> 1234.5), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed


def last_match(pattern: re.Pattern, text: str) -> str | None:
    """The last match of ``pattern``: its group 1 if it has groups, else the whole match."""
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    return m.group(1) if pattern.groups else m.group(0)


def _same(extracted: str, reference: str) -> bool:
    """Equal as numbers when both are numbers, else equal after whitespace collapsing."""
    a, b = normalise(extracted), normalise(reference)
    if a == b:
        return True
    x, y = last_number(a), last_number(b)
    if x is not None and y is not None and _NUMBER.fullmatch(a.replace(" ", "")) and \
            _NUMBER.fullmatch(b.replace(" ", "")):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
    return False


def load_function(spec: str, base: Path | None = None) -> Callable:
    """``"package.module:name"`` -> the callable; ValueError saying what to fix.

    The config file's folder is searched too, so a ``checks.py`` beside the config works.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"function {spec!r}: write it as \"package.module:name\"")
    added = False
    if base is not None and str(base) not in sys.path:
        sys.path.insert(0, str(base))
        added = True
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"function {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
                         "make it importable (installed, or a .py file beside the config)") from None
    finally:
        if added:
            sys.path.remove(str(base))
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


class VerifyOptions(BaseModel):
    """The options of answer checking (the ``verify`` judge's and evaluator's)."""

    model_config = ConfigDict(extra="forbid")

    # How to read the answer: exact | last_number | boxed | regex (with `pattern`).
    extract: Literal["exact", "last_number", "boxed", "regex"] = "exact"
    # For extract = "regex": a Python regex; its group 1 (or the whole match) is compared.
    pattern: str | None = None
    # Or a user function "package.module:name" (prompt, answer, reference) -> score in [0, 1].
    function: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value):
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"pattern {value!r} is not a valid regex ({e})") from None
        return value

    @field_validator("function")
    @classmethod
    def _importable(cls, value, info: ValidationInfo):
        if value is not None:
            base = (info.context or {}).get("source_dir")
            load_function(value, Path(base) if base else None)
        return value

    @model_validator(mode="after")
    def _pattern_for_regex(self):
        if self.extract == "regex" and not self.pattern:
            raise ValueError('extract = "regex" needs a `pattern` (e.g. pattern = "Answer: (.*)")')
        if self.pattern and self.extract != "regex":
            raise ValueError(f'`pattern` is only used with extract = "regex" (extract is {self.extract!r})')
        return self


class Verifier:
    """Scores answers as ``options`` say; ``base`` is where user functions are imported from."""

    def __init__(self, options: VerifyOptions, base: Path | None = None):
        self.options = options
        self._fn = load_function(options.function, base) if options.function else None
        self._pattern = re.compile(options.pattern) if options.pattern else None

    def check(self, prompt: str, answer: str, reference: str) -> Check:
        if self._fn is not None:
            value = self._fn(prompt, answer, reference)
            if value is None:
                return Check(0.0, None, True)
            value = float(value)
            if not 0.0 <= value <= 1.0 or math.isnan(value):
                raise ValueError(f"verify function {self.options.function!r} returned {value}; "
                                 "it must return a score in [0, 1] (or None: could not check)")
            return Check(value, None, False)
        mode = self.options.extract
        if mode == "exact":
            got = normalise(answer)
            return Check(float(got == normalise(reference)), got, False)
        if mode == "last_number":
            x, y = last_number(answer), last_number(reference)
            if x is None:
                return Check(0.0, None, True)
            ok = y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
            return Check(float(ok), f"{x:g}", False)
        got = last_boxed(answer) if mode == "boxed" else last_match(self._pattern, answer)
        if got is None:
            return Check(0.0, None, True)
        ref = last_boxed(reference) if mode == "boxed" and "\\boxed{" in reference else reference
        return Check(float(_same(got, ref)), got, False)
