"""Paired step-time measurement: how much longer one model's training step takes than another's, on a busy machine.

A recipe whose claim is about speed ("RW+LR adds at most 5 % step time") cannot take the median step time of two arms
trained one after the other: the load on a shared machine drifts between them. ``step_time_ratio`` instead builds the
models side by side in one process and times one training step of each (zero_grad, forward, loss, backward, AdamW
step on the same batch) interleaved in balanced rounds (``effml.metrics.timing.time_interleaved``), so that both calls
of a round see the same machine; the result is the per-round ratio of times, summarised by its median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from effml.metrics.timing import paired_time_ratios, require_count, time_interleaved
from effml.optim import build_adamw
from effml.train.loop import TrainConfig, bf16_autocast, compiled, to_device

__all__ = ["TrainingStep", "step_time_ratio"]

LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, Any]]]


class TrainingStep:
    """One optimizer step of ``model`` on a fixed ``batch``, as the trainer takes it (one micro-batch): zero_grad,
    ``loss_fn(model, batch, step) -> (loss, metrics)`` (under bf16 autocast on CUDA), backward, gradient clipping,
    the optimizer's step; callable.

    ``train``: the recipe's ``TrainConfig`` (its lr, weight decay, betas, ``grad_clip`` and ``compile``: the loss
    function gets the compiled model, as in the trainer); without it AdamW at lr 1e-4, no clipping and eager mode, so
    the weights barely move and every call does the same work. ``optimizer``: step this one
    (already built over ``model``'s parameters) instead of a new AdamW.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any, device: str | torch.device = "cpu",
                 train: TrainConfig | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model.to(device).train()
        self.step_model = compiled(self.model, train.compile if train is not None else "")
        self.loss_fn = loss_fn
        self.batch = to_device(batch, device)
        self.grad_clip = train.grad_clip if train is not None else 0.0
        if optimizer is not None:
            self.optimizer = optimizer
        elif train is None:
            self.optimizer = build_adamw(self.model, lr=1e-4, weight_decay=0.0)
        else:
            self.optimizer = build_adamw(self.model, train.lr, train.weight_decay, (train.beta1, train.beta2))
        self.device = device

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with bf16_autocast(self.device):
            loss, _ = self.loss_fn(self.step_model, self.batch, 0)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()


def step_time_ratio(model: nn.Module, reference: nn.Module, loss_fn: LossFn, batch: Any, *, rounds: int,
                    warmup: int = 2, device: str | torch.device = "cpu", train: TrainConfig | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Training-step time of ``model`` over ``reference``'s, both stepped on ``batch``, timed interleaved.

    Returns ``step_time_ratio`` (median over rounds of t_model / t_reference, the two timed in the same round),
    ``step_time_ratio_min`` / ``_max`` (its spread), and the medians ``step_time_model_s`` / ``step_time_reference_s``.
    Both models are trained for ``warmup + rounds`` steps in place, with ``train``'s optimizer settings (see
    ``TrainingStep``). ``clock``: seconds as a float (for tests).
    """
    require_count("rounds", rounds, 1)
    require_count("warmup", warmup, 0)
    steps = {"model": TrainingStep(model, loss_fn, batch, device, train),
             "reference": TrainingStep(reference, loss_fn, batch, device, train)}
    timings = time_interleaved(steps, repeats=rounds, warmup=warmup, device=device, clock=clock)
    ratios = paired_time_ratios(timings["model"].samples, timings["reference"].samples)
    return {"step_time_ratio": statistics.median(ratios), "step_time_ratio_min": min(ratios),
            "step_time_ratio_max": max(ratios), "step_time_model_s": timings["model"].median,
            "step_time_reference_s": timings["reference"].median}
