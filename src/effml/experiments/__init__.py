"""One module per paper: presets, arms, claims. Importing this package registers every built-in recipe."""

from effml.experiments import (  # noqa: F401  (importing a recipe module registers it)
    latentcrf,
    laurel,
    lm_scaling,
    looped_depth,
    looped_gd,
    lora_rite,
    midas,
    mimetic,
    padir,
    salt,
    softsrv,
)
from effml.experiments.base import EXPERIMENTS, Arm, ArmRun, Experiment, RunContext, get_experiment, register

__all__ = ["EXPERIMENTS", "Arm", "ArmRun", "Experiment", "RunContext", "get_experiment", "register"]
