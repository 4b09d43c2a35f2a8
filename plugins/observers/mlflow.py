"""``[[observers]] name = "mlflow"``: an MLflow run, through ``MlflowClient``.

    [[observers]]
    name = "mlflow"
    tracking_uri = "http://localhost:5000"   # or sqlite:///mlflow.db; default: MLFLOW_TRACKING_URI
    experiment = "selfloop"

Round metrics at step = round, training steps as ``train_steps/*`` at step = the run's
training step, the flattened config as parameters (values cut at MLflow's 6000
characters), the HTML report as an artifact, and the run's status at the end (FINISHED,
KILLED for an interrupted run, FAILED). ``mlflow-skinny`` is enough (``selfloop[mlflow]``).
MLflow 3 refuses its file store (``file:...``) unless MLFLOW_ALLOW_FILE_STORE=true is set.
"""

from __future__ import annotations

import time

from plugins.observers.tracker import Tracker, needs

STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MLflowTracker(Tracker):
    name = "mlflow"
    supports_artifacts = True

    class Options(Tracker.Options):
        tracking_uri: str | None = None  # None: MLflow's own default (MLFLOW_TRACKING_URI)
        experiment: str = "selfloop"  # created when missing
        run_name: str | None = None  # default: the selfloop run's name
        tags: dict[str, str] = {}  # extra MLflow run tags

        _needs = needs("mlflow", "mlflow")

    def open(self, run, params, config):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        o = self.options
        self.client = MlflowClient(tracking_uri=o.tracking_uri)
        state = self.load_state(run)
        if state.get("run_id") and state.get("tracking_uri") == o.tracking_uri:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(o.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(o.experiment)
        tags = {"selfloop.run_dir": str(run.run_dir), **o.tags}
        self.run_id = self.client.create_run(exp_id, run_name=o.run_name or run.name,
                                             tags=tags).info.run_id
        self.save_state(run, {"run_id": self.run_id, "tracking_uri": o.tracking_uri})
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for chunk in _chunks(items, 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=chunk)

    def log(self, metrics, step, axis):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for chunk in _chunks(items, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)

    def artifact(self, path):
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status):
        self.client.set_terminated(self.run_id, status=STATUS.get(status, "FAILED"))
