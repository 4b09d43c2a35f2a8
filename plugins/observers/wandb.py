"""``[[observers]] name = "wandb"``: a Weights & Biases run.

    [[observers]]
    name = "wandb"
    project = "my-project"
    mode = "offline"       # or "online" (needs `wandb login` / WANDB_API_KEY), "disabled"

Round metrics against the ``round`` step metric, training steps (``train_steps/*``) against
``train_step`` (W&B's ``define_metric``), the resolved config as the run config, the HTML
report as an artifact of type ``report``. The W&B run id is kept in the run folder, so a
resumed selfloop run continues the same W&B run. Keys are never read from the config:
W&B reads WANDB_API_KEY itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from plugins.observers.tracker import Tracker, needs


class WandbTracker(Tracker):
    name = "wandb"
    supports_artifacts = True

    class Options(Tracker.Options):
        project: str = "selfloop"  # the W&B project the run is logged to
        entity: str | None = None  # team or user; W&B's default when unset
        run_name: str | None = None  # default: the selfloop run's name
        group: str | None = None  # W&B run group (e.g. one per sweep)
        tags: list[str] = []  # W&B tags on the run
        mode: Literal["online", "offline", "disabled"] | None = None  # None: W&B's (WANDB_MODE)
        dir: str | None = None  # where W&B writes its wandb/ folder; default: the run folder

        _needs = needs("wandb", "wandb")

    def open(self, run, params, config):
        import wandb

        o = self.options
        state = self.load_state(run)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                  disable_git=True, save_code=False)
        self.wb = wandb.init(
            project=o.project, entity=o.entity, name=o.run_name or run.name, group=o.group,
            tags=o.tags or None, mode=o.mode, dir=str(Path(run.run_dir) / (o.dir or ".")),
            config=config, id=state.get("id"), resume="allow" if state.get("id") else None,
            settings=settings, reinit="create_new",
        )
        self.save_state(run, {"id": self.wb.id})
        self.wb.define_metric("round")
        self.wb.define_metric("train_step")
        self._defined: set[str] = set()

    def log(self, metrics, step, axis):
        for key in metrics.keys() - self._defined:
            self.wb.define_metric(key, step_metric=axis)
            self._defined.add(key)
        self.wb.log({axis: step, **metrics})

    def artifact(self, path):
        import wandb

        art = wandb.Artifact(f"{self.wb.name or 'selfloop'}-report".replace("/", "-"), type="report")
        art.add_file(str(path))
        self.wb.log_artifact(art)

    def finish(self, status):
        self.wb.finish(exit_code=0 if status == "completed" else 1)
