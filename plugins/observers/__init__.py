"""Experiment trackers as observers: ``[[observers]] name = "tensorboard" | "wandb" |
"mlflow" | "trackio"``. Each library is imported only when its observer runs; install it
with the extra of the same name (``pip install 'selfloop[wandb]'``)."""

import loop

from plugins.observers.mlflow import MLflowTracker
from plugins.observers.tensorboard import TensorBoardTracker
from plugins.observers.trackio import TrackioTracker
from plugins.observers.wandb import WandbTracker


@loop.hookimpl(trylast=True)
def register_observers(register):
    for cls in (TensorBoardTracker, WandbTracker, MLflowTracker, TrackioTracker):
        register(cls)
