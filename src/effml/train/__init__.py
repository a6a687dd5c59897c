"""The training loop and its pieces: checkpoints, distributed set-up, LM losses."""

from effml.train.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from effml.train.distributed import World, current_world, init_distributed
from effml.train.loop import (
    Callback,
    NonFiniteLoss,
    Trainer,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    to_device,
)

__all__ = [
    "Callback",
    "Checkpoint",
    "CheckpointError",
    "NonFiniteLoss",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "TrainResult",
    "World",
    "current_world",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "to_device",
]
