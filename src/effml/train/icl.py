"""In-context regression objective and batches shared by the looped-transformer recipes (``looped-depth``,
``looped-gd``): squared error on the query prediction (their fresh prompts every step come from
``effml.data.batches.sampled_batches``).

The model maps a :class:`effml.data.tasks.regression.RegressionBatch`'s prompt matrix ``(B, d+1, n+1)`` to query
predictions ``(B,)`` (``effml.nn.LinearTransformer``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from effml.data.tasks.regression import RegressionBatch
from effml.nn.linear_attention import prompt_matrix

__all__ = ["query_mse_loss", "predict_readouts", "intra_op_threads"]


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` and restore the previous setting afterwards.

    The looped-transformer models are tiny (a few hundred parameters, (d+1)×(n+1) matrices): one CPU thread runs
    a training step several times faster than two, which spend more time synchronising than computing.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def query_mse_loss(model: nn.Module, batch: RegressionBatch, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean squared error of the query prediction; also reports it normalised by the mean squared target (nmse). The
    prompt is cast to the model's dtype (a model converted with ``.double()`` trains in float64)."""
    dtype = next(model.parameters()).dtype
    predictions = model(prompt_matrix(batch.xs, batch.ys, batch.query).to(dtype))
    loss = ((predictions - batch.target.to(dtype)) ** 2).mean()
    return loss, {"train_nmse": loss.detach() / batch.target.pow(2).mean()}


def predict_readouts(model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                     **forward_options: Any):
    """A ``predict`` function for ``InContextRegression.evaluate`` that returns every read-out ``(K, B)``; the prompt
    matrix is cast to ``dtype`` when given (a model converted with ``.double()`` is evaluated in float64)."""

    @torch.no_grad()
    def predict(batch: RegressionBatch) -> torch.Tensor:
        batch = batch.to(device)
        z = prompt_matrix(batch.xs, batch.ys, batch.query)
        return model(z if dtype is None else z.to(dtype), readouts=True, **forward_options)

    return predict
