"""One module per paper: presets, arms, claims. Importing this package registers every built-in recipe."""

from effml.experiments import lm_scaling  # noqa: F401  (registers lm-scaling)
from effml.experiments import mimetic  # noqa: F401  (registers mimetic)
from effml.experiments.base import EXPERIMENTS, Arm, ArmRun, Experiment, RunContext, get_experiment, register

__all__ = ["EXPERIMENTS", "Arm", "ArmRun", "Experiment", "RunContext", "get_experiment", "register"]
