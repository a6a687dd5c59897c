"""Language-modelling objective and held-out evaluation shared by the LM recipes.

Held-out loss is in nats per token; `effml.data.CorpusSplits.bits_per_byte` converts it to bits per byte, which
compares models across tokenizers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effml.train.distributed import World, all_reduce_sum

__all__ = ["causal_lm_loss", "heldout_nats_per_token"]


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                   step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean next-token cross-entropy (nats). batch = (inputs (B, T), targets (B, T)); model maps (B, T) → (B, T, V)."""
    inputs, targets = batch
    logits = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss, {}


@torch.no_grad()
def heldout_nats_per_token(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                           max_windows: int | None, world: World, device: torch.device | str = "cpu") -> float:
    """Mean cross-entropy (nats/token) over fixed held-out windows; ranks share the windows and sum their totals."""
    from effml.data import eval_windows

    total = torch.zeros(2, dtype=torch.float64)
    for index, (inputs, targets) in enumerate(eval_windows(tokens, seq_len, batch_size, max_windows)):
        if index % world.world_size != world.rank:
            continue
        logits = model(inputs.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
        total += torch.tensor([loss.item(), targets.numel()], dtype=torch.float64)
    all_reduce_sum(total)
    if total[1] == 0:
        raise ValueError(f"The held-out split has fewer than {seq_len + 1} tokens: no window to evaluate on.")
    return float(total[0] / total[1])

