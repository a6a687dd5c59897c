"""Paired step timing (effml.train.step_timing): what is timed, and the per-round ratio it reports."""

import pytest
import torch
from torch import nn

from effml.train import TrainConfig
from effml.train.step_timing import TrainingStep, step_time_ratio


def _regression_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int):
    inputs, targets = batch
    return (model(inputs) - targets).square().mean(), {}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)


def test_training_step_takes_one_optimizer_step_on_the_batch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainingStep(model, _regression_loss, _batch())
    step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert len(step.optimizer.state) == 2  # AdamW state for weight and bias: the step really ran the optimizer


def test_ratio_is_the_median_of_per_round_time_ratios() -> None:
    """A fake clock advanced by the loss function: the model's step "takes" 3 units, the reference's 2, except one
    round where the machine "stalls" during the model's step; the median of per-round ratios ignores that round."""
    now = [0.0]
    calls = {"model": 0}
    model, reference = nn.Linear(4, 2), nn.Linear(4, 2)

    def loss_fn(net: nn.Module, batch, step: int):
        if net is model:
            calls["model"] += 1
            now[0] += 30.0 if calls["model"] == 4 else 3.0  # warm-up is 2 calls, so the 2nd timed round stalls
        else:
            now[0] += 2.0
        return _regression_loss(net, batch, step)

    result = step_time_ratio(model, reference, loss_fn, _batch(), rounds=5, warmup=2, clock=lambda: now[0])
    assert result["step_time_ratio"] == pytest.approx(1.5)
    assert result["step_time_ratio_max"] == pytest.approx(15.0)
    assert result["step_time_ratio_min"] == pytest.approx(1.5)
    assert result["step_time_model_s"] == pytest.approx(3.0) and result["step_time_reference_s"] == pytest.approx(2.0)


def test_ratio_refuses_no_rounds_naming_its_own_argument() -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        step_time_ratio(model, torch.nn.Linear(2, 1), lambda m, b, s: (m(b).sum(), {}), torch.ones(1, 2), rounds=0)


def test_a_training_step_compiles_the_model_as_the_recipes_trainer_does() -> None:
    """With ``train.compile`` set, the timed step is the compiled one (what claim 3 of laurel should time on a GPU)."""
    called_with = []

    def loss_fn(model, batch, step):
        called_with.append(type(model).__name__)
        return model(batch).square().mean(), {}

    model = torch.nn.Linear(3, 1)
    step = TrainingStep(model, loss_fn, torch.ones(2, 3), train=TrainConfig(compile="aot_eager"))
    before = model.weight.detach().clone()
    step()
    step()
    assert called_with == ["OptimizedModule", "OptimizedModule"]
    assert not torch.equal(model.weight, before)  # the compiled module trains the model's own parameters
