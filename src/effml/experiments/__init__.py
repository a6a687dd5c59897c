"""One module per paper: presets, arms, claims. Importing this package registers every built-in recipe."""

from effml.experiments import lm_scaling  # noqa: F401  (registers lm-scaling)
from effml.experiments import looped_depth, looped_gd  # noqa: F401  (registers looped-depth, looped-gd)
from effml.experiments import lora_rite  # noqa: F401  (registers lora-rite)
from effml.experiments.base import EXPERIMENTS, Arm, ArmRun, Experiment, RunContext, get_experiment, register

__all__ = ["EXPERIMENTS", "Arm", "ArmRun", "Experiment", "RunContext", "get_experiment", "register"]
