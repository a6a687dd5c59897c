"""Image-classification objective and evaluation (cross-entropy, accuracy), shared by vision recipes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effml.train.distributed import World, all_reduce_sum

__all__ = ["classification_loss", "classification_metrics"]


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                        step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean cross-entropy (nats) of ``model(images)`` (B, C) against ``labels`` (B,); also the batch accuracy."""
    images, labels = batch
    logits = model(images)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return F.cross_entropy(logits.float(), labels), {"train_accuracy": accuracy.detach()}


@torch.no_grad()
def classification_metrics(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                           device: torch.device | str = "cpu", world: World | None = None) -> dict[str, float]:
    """``{"loss": mean cross-entropy, "accuracy": percent correct}`` over every example of ``batches`` (eval mode is
    set and the previous mode restored). With a data-parallel ``world``, ``batches`` is this rank's share of the
    split and the metrics are over every rank's (a collective: every rank must call it)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
        count += labels.numel()
    model.train(was_training)
    if world is not None and world.distributed:
        totals = all_reduce_sum(torch.tensor([loss_sum, correct, count], dtype=torch.float64))
        loss_sum, correct, count = float(totals[0]), int(totals[1]), int(totals[2])
    if count == 0:
        raise ValueError("classification_metrics: the evaluation split is empty.")
    return {"loss": loss_sum / count, "accuracy": 100.0 * correct / count}
