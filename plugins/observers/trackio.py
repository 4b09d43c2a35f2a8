"""``[[observers]] name = "trackio"``: a trackio run (local SQLite under TRACKIO_DIR, or a
Space / server when trackio is configured so).

    [[observers]]
    name = "trackio"
    project = "my-project"

Round metrics at step = round and training steps as ``train_steps/*`` at step = the run's
training step (trackio keeps one series per key), the resolved config as the run config,
the HTML report as an artifact of type ``report``.
"""

from __future__ import annotations

import contextlib
import io

from plugins.observers.tracker import Tracker, needs


class TrackioTracker(Tracker):
    name = "trackio"
    supports_artifacts = True

    class Options(Tracker.Options):
        project: str = "selfloop"  # the trackio project the run is logged to
        run_name: str | None = None  # default: the selfloop run's name
        group: str | None = None  # trackio run group

        _needs = needs("trackio", "trackio")

    def open(self, run, params, config):
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):  # its banner would break the dashboard
            self.tr = trackio.init(
                project=self.options.project, name=self.options.run_name or run.name,
                group=self.options.group, config=config, embed=False, auto_log_cpu=False,
                auto_log_gpu=False, resume="allow" if run.resumed else "never")

    def log(self, metrics, step, axis):
        self.tr.log(metrics, step=step)

    def artifact(self, path):
        self.tr.log_artifact(str(path), name=f"{self.tr.name}-report", type="report")

    def finish(self, status):
        from trackio import context_vars

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.tr.finish()
        finally:  # trackio keeps a current run of its own
            if context_vars.current_run.get() is self.tr:
                context_vars.current_run.set(None)
