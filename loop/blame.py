"""Error attribution: whatever goes wrong while a component runs is that component's.

``blame(comp, what)`` wraps the code that runs a component: its ``setup``, its method,
the check of what it returned, and anything the runner does with its output that only it
can get wrong (installing the adapter an updater wrote). Anything that escapes the block,
``SystemExit`` and a stray ``KeyboardInterrupt`` included, comes out as ``ComponentFailed``
naming the component and its plugin, so the runner never keeps "who runs now" by hand.
Only the runner's own stop (``StopNow``) passes through. An inner ``blame`` wins over an
outer one: the component that really ran is named.

``check_result`` refuses a return value of the wrong shape (the wrong record type, a
list of the wrong items, metrics that are not numbers), so a malformed result fails in
the component that returned it and not later in the runner.
"""

from __future__ import annotations

from contextlib import contextmanager
from numbers import Real
from typing import Iterator

from loop import components as c
from loop.interrupts import StopNow


class ComponentFailed(Exception):
    """``error`` escaped from ``component`` while the runner did ``what``."""

    def __init__(self, component: c.Component, what: str, error: BaseException):
        self.component = component
        self.what = what
        self.error = error
        super().__init__(f"{self.who}, {what}: {describe(error)}")

    @property
    def plugin(self) -> str | None:
        return self.component.plugin

    @property
    def who(self) -> str:
        comp = self.component
        return f"{comp.kind} {comp.label!r} (plugin {comp.plugin})"


def describe(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit: it called sys.exit({error.code!r})"
    if isinstance(error, KeyboardInterrupt):
        return "KeyboardInterrupt: it raised one itself (no stop signal came)"
    return f"{type(error).__name__}: {error}"


@contextmanager
def blame(component: c.Component, what: str) -> Iterator[None]:
    try:
        yield
    except (StopNow, ComponentFailed):
        raise
    except BaseException as e:  # noqa: BLE001 - SystemExit, KeyboardInterrupt: all its doing
        raise ComponentFailed(component, what, e) from e


# method -> (the record it returns, {field: item type}) ; None: a plain list or dict
_RECORDS = {
    "optimise": (c.OptimiseResult, {"prompts": c.Prompt, "new_prompts": c.Prompt,
                                    "instructions": c.Instruction}),
    "judge": (c.JudgeResult, {"judgments": c.Judgment, "candidates": c.Candidate,
                              "pairs": c.Pair}),
    "select": (c.Selection, {"pairs": c.Pair, "selected": c.Selected}),
    "update": (c.UpdateResult, {"steps": c.TrainStep}),
}
_KIND_ARTICLE = {"optimise": "a prompt optimiser", "judge": "a judge", "select": "a selector",
                 "update": "an updater", "propose": "a prompt source", "generate": "a generator",
                 "evaluate": "an evaluator"}


def check_result(method: str, result) -> None:
    """Raise ``TypeError`` (one line) when ``result`` is not what ``method`` returns."""
    who = _KIND_ARTICLE.get(method)
    if who is None:
        return
    if method == "propose":
        _items(result, c.Prompt, f"{method}() returned", f"{who} returns a list of loop.Prompt")
    elif method == "generate":
        _items(result, list, f"{method}() returned",
               f"{who} returns one list of loop.Completion per chat")
        for i, samples in enumerate(result):
            _items(samples, c.Completion, f"{method}() list {i} holds",
                   f"{who} returns lists of loop.Completion")
    elif method == "evaluate":
        _metrics(result, f"{method}() returned", f"{who} returns {{'group/name': number}}")
    else:
        record, fields = _RECORDS[method]
        if not isinstance(record, type) or not isinstance(result, record):
            raise TypeError(f"{method}() returned {type(result).__name__}; {who} returns "
                            f"loop.{record.__name__}")
        for name, item in fields.items():
            _items(getattr(result, name), item, f"{method}() .{name} is",
                   f"it must be a list of loop.{item.__name__}")
        _metrics(result.metrics, f"{method}() .metrics is", "it must map 'group/name' to numbers")


def _items(value, item: type, said: str, fix: str) -> None:
    if not isinstance(value, list):
        raise TypeError(f"{said} {type(value).__name__}; {fix}")
    bad = next((x for x in value if not isinstance(x, item)), None)
    if bad is not None:
        raise TypeError(f"{said} a list holding {type(bad).__name__}; {fix}")


def _metrics(value, said: str, fix: str) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"{said} {type(value).__name__}; {fix}")
    for k, v in value.items():
        if not isinstance(k, str) or not _number(v):
            raise TypeError(f"{said} holding {k!r}: {type(v).__name__}; {fix}")


def _number(v) -> bool:
    """What the store can keep as a metric: None, or anything ``float()`` takes but text
    (a numpy or 0-d torch value included)."""
    if v is None or isinstance(v, Real):
        return True
    if isinstance(v, (str, bytes)):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True
