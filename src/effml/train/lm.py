"""Language-modelling objective and held-out evaluation shared by the LM recipes.

Held-out loss is in nats per token; `effml.data.CorpusSplits.bits_per_byte` converts it to bits per byte, which
compares models across tokenizers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effml.train.distributed import World, all_reduce_sum, current_world

__all__ = ["causal_lm_loss", "heldout_nats_per_token", "logits_of", "token_share"]


def logits_of(output: Any) -> torch.Tensor:
    """The (B, T, V) logits of a causal LM's forward: ``output.logits`` for a Hugging Face model's output, else the
    output itself (effml's models return the logits)."""
    return output.logits if hasattr(output, "logits") else output


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                   step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean next-token cross-entropy (nats). batch = (inputs (B, T), targets (B, T)); model maps (B, T) → (B, T, V)
    logits, or to a Hugging Face output carrying them (``logits_of``)."""
    inputs, targets = batch
    logits = logits_of(model(inputs))
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss, {}


def token_share(mask: torch.Tensor) -> torch.Tensor:
    """Weight for a rank's mean loss over the positions of ``mask`` (any shape, bool) that makes data parallelism
    average over every rank's tokens: n_r / mean over ranks of n_r', where n_r counts this rank's True positions.

    DDP and FSDP average the ranks' gradients; when masks leave the ranks different numbers of tokens, the plain mean
    of their per-rank means is not the mean over the global batch that one process takes. Multiplying each rank's
    mean by this weight makes it so. It is a collective (every rank must call it, once per micro-batch) and exactly
    1.0 in a world of one (or with equal counts), so single-process runs are unchanged to the bit. Returns a float32
    scalar on ``mask``'s device, without gradient.
    """
    count = mask.sum().to(torch.float32)
    world_size = current_world().world_size
    mean_count = all_reduce_sum(count.clone()) / world_size if world_size > 1 else count
    return count / mean_count.clamp_min(1.0)


@torch.no_grad()
def heldout_nats_per_token(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                           max_windows: int | None, world: World, device: torch.device | str = "cpu") -> float:
    """Mean cross-entropy (nats/token) over fixed held-out windows; ranks share the windows and sum their totals.

    Every rank calls ``model`` equally often (a rank left one batch short repeats a batch and discards it), as a
    model sharded with FSDP needs every rank in each forward."""
    from effml.data import eval_windows

    total = torch.zeros(2, dtype=torch.float64)
    n_batches = forwards = 0
    spare: torch.Tensor | None = None
    for index, (inputs, targets) in enumerate(eval_windows(tokens, seq_len, batch_size, max_windows)):
        n_batches, spare = index + 1, inputs if spare is None else spare
        if index % world.world_size != world.rank:
            continue
        logits = model(inputs.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
        total += torch.tensor([loss.item(), targets.numel()], dtype=torch.float64)
        forwards += 1
    for _ in range(math.ceil(n_batches / world.world_size) - forwards):  # as many forwards as the busiest rank
        model(spare.to(device))
    all_reduce_sum(total)
    if total[1] == 0:
        raise ValueError(f"The held-out split has fewer than {seq_len + 1} tokens: no window to evaluate on.")
    return float(total[0] / total[1])

