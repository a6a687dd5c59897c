"""Optimizers and learning-rate schedules."""

from effml.optim.adamw import build_adamw, decay_groups
from effml.optim.schedules import Constant, WarmupCosine

__all__ = ["build_adamw", "decay_groups", "Constant", "WarmupCosine"]
