"""``[[observers]] name = "tensorboard"``: event files for TensorBoard.

    [[observers]]
    name = "tensorboard"
    logdir = "tb"          # default: <run_dir>/tensorboard; then `tensorboard --logdir ...`

Scalars under their ``group/name`` tags (round metrics at step = round, per-step training
values under ``train_steps/*`` at step = the run's training step); the config as a text
summary ``config``. TensorBoard has no artifacts: the report is not logged.
"""

from __future__ import annotations

import json
from pathlib import Path

from plugins.observers.tracker import Tracker, needs


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    class Options(Tracker.Options):
        logdir: str | None = None  # event file folder; relative to the run folder
        flush_secs: int = 30  # how often the writer flushes by itself (it also flushes each round)

        _needs = needs("tensorboard", "tensorboard")

    def open(self, run, params, config):
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(run.run_dir) / (self.options.logdir or "tensorboard")
        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=self.options.flush_secs)
        text = json.dumps(config, indent=2, sort_keys=True)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log(self, metrics, step, axis):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        if axis == "round":
            self.writer.flush()

    def finish(self, status):
        self.writer.add_text("status", status, 0)
        self.writer.close()
