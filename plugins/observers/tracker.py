"""What every experiment tracker logs, and when: the shared half of the tracker observers.

A ``Tracker`` is a ``loop.Observer``; each tracker plugin implements five small methods
(``open``, ``log``, ``artifact``, ``finish``, and ``supports_artifacts``). The base turns
the run into tracker calls:

- run_start: ``open`` with the run's resolved config, flattened (``updater.beta``,
  ``judges.0.name``) as the tracker's parameters.
- phase_end of a done update: every stored training step of that round, under
  ``train_steps/<name>`` (``train_steps/loss``, ``train_steps/rewards/margin``, ...) on the
  ``train_step`` axis: a step counter over the whole run (round 1's steps, then round 2's).
- round_end: every metric of the round under its ``group/name`` key on the ``round`` axis,
  plus ``time/<phase>`` (seconds per phase this round).
- run_end: the HTML report (loop/html_report.py) written to ``<run_dir>/report.html`` and
  logged as an artifact where the tracker has artifacts, then ``finish`` with the status.

A tracker's ids (W&B run id, MLflow run id) are kept in ``<run_dir>/observers/<name>.json``
so that a resumed run continues the same tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from pydantic import model_validator

import loop
from loop.report_read import flat_config

ROUND_AXIS = "round"
STEP_AXIS = "train_step"


def finite(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def run_config(run) -> dict:
    """The resolved config stored with the run (component defaults filled in)."""
    row = run.store.run_row() or {}
    try:
        return json.loads(row.get("config") or "{}")
    except ValueError:
        return run.config.dump()


def needs(module: str, extra: str):
    """An Options validator: refuse the config early when the tracker's library is missing."""

    @model_validator(mode="after")
    def _check(self):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"needs the {module} package: pip install 'selfloop[{extra}]'")
        return self

    return _check


_reports: dict[int, Path] = {}  # one report per run and process, however many trackers


def write_report(run) -> Path:
    key = id(run)
    if key not in _reports:
        from loop.html_report import write_html

        path = Path(run.run_dir) / "report.html"
        write_html(run.store, path)
        _reports.clear()
        _reports[key] = path
    return _reports[key]


class Tracker(loop.Observer):
    """Base of the tracker observers (see the module docstring)."""

    supports_artifacts = False

    class Options(loop.Observer.Options):
        report: bool = True  # log the HTML report as an artifact at the end (where supported)

    def __init__(self, options=None, *, label=None):
        super().__init__(options, label=label)
        self._open = False
        self._times: dict[str, float] = {}

    # -- what a tracker implements ---------------------------------------------------

    def open(self, run, params: dict[str, object], config: dict) -> None:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int, axis: str) -> None:
        raise NotImplementedError

    def artifact(self, path: Path) -> None:
        """Log a file (only called when ``supports_artifacts``)."""

    def finish(self, status: str) -> None:
        raise NotImplementedError

    # -- state kept in the run folder (tracker run ids, for resume) --------------------

    def state_path(self, run) -> Path:
        return Path(run.run_dir) / "observers" / f"{self.label}.json"

    def load_state(self, run) -> dict:
        path = self.state_path(run)
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                return {}
        return {}

    def save_state(self, run, state: dict) -> None:
        path = self.state_path(run)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)

    # -- the lifecycle -------------------------------------------------------------

    def run_start(self, run):
        config = run_config(run)
        self.open(run, flat_config(config), config)
        self._open = True

    def phase_end(self, run, round, phase, status, seconds):
        if status != "done":
            return
        self._times[phase] = seconds
        if phase == "update":
            before = run.store.rows("select count(*) n from train_steps where round < ?", [round])
            offset = before[0]["n"]
            for i, row in enumerate(run.store.train_steps(round)):
                values = {"loss": row["loss"], "learning_rate": row["learning_rate"],
                          "grad_norm": row["grad_norm"], **json.loads(row["metrics"] or "{}")}
                values = finite({f"train_steps/{k}": v for k, v in values.items()})
                values["train_steps/round"] = float(round)
                self.log(values, offset + i + 1, STEP_AXIS)

    def round_end(self, run, round, metrics):
        values = finite(metrics)
        values.update({f"time/{phase}": s for phase, s in self._times.items()})
        self._times = {}
        self.log(values, round, ROUND_AXIS)

    def run_end(self, run, status):
        if not self._open:
            return
        try:
            if self.supports_artifacts and self.options.report:
                self.artifact(write_report(run))
        finally:
            self._open = False
            self.finish(status)

    def close(self):
        if self._open:  # the run stopped without run_end (a crash)
            self._open = False
            self.finish("failed")
