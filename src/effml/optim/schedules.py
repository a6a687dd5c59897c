"""Learning-rate schedules as pure functions of the global step.

A schedule maps the global optimizer step to a multiplier of the peak learning rate. Being a function of the global
step (not of a scheduler object's internal counter) is what lets a run resume exactly and lets a growing model
(MIDAS stages) continue the same schedule across stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WarmupCosine", "Constant"]


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``.

    multiplier(s) = (s + 1) / warmup_steps                                  for s < warmup_steps
                  = min_ratio + (1 - min_ratio) · ½(1 + cos(π · p)),  p = (s - warmup) / (total - warmup)  otherwise
    Steps past ``total_steps`` stay at ``min_ratio``.
    """

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.total_steps <= 0 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"WarmupCosine needs total_steps > 0 and 0 ≤ warmup_steps ≤ total_steps; got total_steps="
                f"{self.total_steps}, warmup_steps={self.warmup_steps}."
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"WarmupCosine.min_ratio = {self.min_ratio} must lie in [0, 1].")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Constant:
    """multiplier(s) = 1 for every step."""

    def __call__(self, step: int) -> float:
        return 1.0
