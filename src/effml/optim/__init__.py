"""Optimizers and learning-rate schedules."""

from effml.optim.adamw import build_adamw, decay_groups
from effml.optim.lora_rite import LoRARite, find_lora_pairs
from effml.optim.schedules import Constant, WarmupCosine

__all__ = ["build_adamw", "decay_groups", "Constant", "WarmupCosine", "LoRARite", "find_lora_pairs"]
