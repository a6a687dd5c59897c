"""One module per paper: presets, arms, claims. Importing this package registers every built-in recipe."""

from effml.experiments import laurel, lm_scaling  # noqa: F401  (registers the recipes)
from effml.experiments.base import EXPERIMENTS, Arm, ArmRun, Experiment, RunContext, get_experiment, register

__all__ = ["EXPERIMENTS", "Arm", "ArmRun", "Experiment", "RunContext", "get_experiment", "register"]
