"""The diffusion U-Net (effml.diffusion.unet): shapes, the zero-initialised output, dependence on every input,
per-example independence, gradient flow, input and config validation, and the parameter count by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effml.config import ConfigError
from effml.diffusion import UNet, UNetConfig

ONE_LEVEL = UNetConfig(image_size=8, base_channels=8, channel_multipliers=(1,), attention_levels=(), groups=2,
                       num_classes=3)
TWO_LEVELS = UNetConfig(in_channels=3, image_size=8, base_channels=8, channel_multipliers=(1, 2),
                        blocks_per_level=2, attention_levels=(0, 1), groups=4, attention_heads=2, num_classes=3,
                        dropout=0.1)


def _model(config: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose output conv is moved off its zero init, so the output depends on the body of the network."""
    torch.manual_seed(seed)
    model = UNet(config)
    nn.init.normal_(model.output_conv.weight, std=0.1)
    nn.init.normal_(model.output_conv.bias, std=0.1)
    return model


def _inputs(config: UNetConfig, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, C, H, W), integer timesteps (B,) in [0, 1000), labels (B,) in [0, num_classes)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    labels = torch.randint(0, max(config.num_classes, 1), (batch,), generator=generator)
    return x, timesteps, labels


@pytest.mark.parametrize("config", [ONE_LEVEL, TWO_LEVELS, UNetConfig()], ids=["one_level", "two_levels", "default"])
def test_output_has_the_input_shape(config: UNetConfig) -> None:
    x, timesteps, labels = _inputs(config, batch=2)
    assert _model(config)(x, timesteps, labels).shape == x.shape


def test_output_is_zero_at_initialisation() -> None:
    torch.manual_seed(0)
    model = UNet(TWO_LEVELS)
    x, timesteps, labels = _inputs(TWO_LEVELS, batch=3)
    assert torch.count_nonzero(model(x, timesteps, labels)) == 0


def test_output_depends_on_input_timestep_and_label() -> None:
    model = _model(TWO_LEVELS).eval()
    x, timesteps, labels = _inputs(TWO_LEVELS, batch=2)
    with torch.no_grad():
        reference = model(x, timesteps, labels)
        changed = {
            "input": model(x + 0.5 * torch.randn_like(x), timesteps, labels),
            "timestep": model(x, timesteps + 100, labels),
            "label": model(x, timesteps, (labels + 1) % TWO_LEVELS.num_classes),
        }
    for what, output in changed.items():
        assert (output - reference).abs().amax(dim=(1, 2, 3)).min() > 1e-3, f"output does not depend on the {what}"


def test_no_labels_means_the_null_class() -> None:
    model = _model(TWO_LEVELS).eval()
    x, timesteps, labels = _inputs(TWO_LEVELS, batch=2)
    null = torch.full_like(labels, TWO_LEVELS.num_classes)
    with torch.no_grad():
        torch.testing.assert_close(model(x, timesteps, None), model(x, timesteps, null), rtol=0, atol=0)
        assert (model(x, timesteps, None) - model(x, timesteps, labels)).abs().max() > 1e-3


def test_unconditional_model_has_no_class_embedding() -> None:
    config = UNetConfig(image_size=8, base_channels=8, channel_multipliers=(1,), attention_levels=(), groups=2,
                        num_classes=0)
    model = _model(config)
    assert model.class_embedding is None
    x, timesteps, _ = _inputs(config, batch=2)
    torch.testing.assert_close(model(x, timesteps), model(x, timesteps, torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 0\]"):
        model(x, timesteps, torch.ones(2, dtype=torch.long))


def test_examples_are_independent_in_eval_mode() -> None:
    model = _model(TWO_LEVELS).eval()
    x, timesteps, labels = _inputs(TWO_LEVELS, batch=4)
    with torch.no_grad():
        batched = model(x, timesteps, labels)
        for i in range(len(x)):
            alone = model(x[i:i + 1], timesteps[i:i + 1], labels[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-6)


def test_every_parameter_gets_a_finite_nonzero_gradient() -> None:
    model = _model(TWO_LEVELS)
    x, timesteps, labels = _inputs(TWO_LEVELS, batch=3)
    loss = (model(x, timesteps, labels) - torch.randn_like(x)).square().mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().max() > 0, f"{name} has an all-zero gradient"


def test_float_timesteps_give_the_same_output_as_integer_ones() -> None:
    model = _model(ONE_LEVEL).eval()
    x, timesteps, labels = _inputs(ONE_LEVEL, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, timesteps.float(), labels), model(x, timesteps, labels), rtol=0, atol=0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"image_size": 12, "channel_multipliers": (1, 1, 1, 1)}, r"image_size = 12 must be divisible by .* = 8"),
    ({"attention_levels": (3,)}, r"attention_levels = 3 is not allowed: choose one of 0, 1, 2"),
    ({"attention_levels": (1, 1)}, r"attention_levels = \[1, 1\] lists 1 twice"),
    ({"groups": 12}, r"groups = 12 does not suit a level with 32 channels"),
    ({"base_channels": 8, "groups": 8}, r"groups = 8 does not suit a level with 8 channels"),
    ({"attention_heads": 3}, r"attention_heads = 3 must divide"),
    ({"base_channels": 15, "groups": 5}, r"base_channels = 15 must be even"),
    ({"channel_multipliers": ()}, r"channel_multipliers = \(\) must be a non-empty tuple"),
    ({"blocks_per_level": 0}, r"blocks_per_level = 0 is out of range"),
    ({"num_classes": -1}, r"num_classes = -1 is out of range"),
    ({"dropout": 1.0}, r"dropout = 1.0 would zero"),
])
def test_invalid_configs_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UNetConfig(**changes)


def test_inputs_that_do_not_fit_are_refused() -> None:
    model = _model(ONE_LEVEL)
    x, timesteps, labels = _inputs(ONE_LEVEL, batch=2)
    with pytest.raises(ValueError, match=r"x has shape \(2, 2, 8, 8\); expected \(B, 1, 8, 8\)"):
        model(torch.cat([x, x], dim=1), timesteps, labels)
    with pytest.raises(ValueError, match=r"x has shape \(2, 1, 16, 16\); expected \(B, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 16, 16), timesteps, labels)
    with pytest.raises(ValueError, match=r"timesteps has shape \(3,\); expected \(2,\)"):
        model(x, torch.zeros(3, dtype=torch.long), labels)
    with pytest.raises(ValueError, match=r"labels has shape \(2,\) and dtype torch.float32"):
        model(x, timesteps, labels.float())
    for bad in (-1, ONE_LEVEL.num_classes + 1):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\] \(3 is the null class\)"):
            model(x, timesteps, torch.tensor([0, bad]))
    model(x, timesteps, torch.tensor([0, ONE_LEVEL.num_classes]))  # the null class index is a valid label


def test_parameter_count_matches_the_layer_formulas() -> None:
    config = UNetConfig(image_size=8, base_channels=8, channel_multipliers=(1,), blocks_per_level=1,
                        attention_levels=(), groups=2, num_classes=2)

    def conv(c_in: int, c_out: int, kernel: int) -> int:
        return c_in * c_out * kernel * kernel + c_out

    def linear(d_in: int, d_out: int) -> int:
        return d_in * d_out + d_out

    def group_norm(channels: int) -> int:
        return 2 * channels

    embedding = 4 * 8
    expected = (
        linear(8, embedding) + linear(embedding, embedding)  # timestep MLP
        + 3 * embedding  # class embedding: 2 classes + the null class
        + conv(1, 8, 3)  # input conv
        # down: one residual block 8 → 8 (no downsample: a single level)
        + group_norm(8) + conv(8, 8, 3) + linear(embedding, 8) + group_norm(8) + conv(8, 8, 3)
        # middle: two residual blocks 8 → 8 around one self-attention block
        + 2 * (group_norm(8) + conv(8, 8, 3) + linear(embedding, 8) + group_norm(8) + conv(8, 8, 3))
        + group_norm(8) + linear(8, 3 * 8) + linear(8, 8)
        # up: blocks_per_level + 1 = 2 residual blocks 8 + 8 skip channels → 8, with a 1×1 skip conv
        + 2 * (group_norm(16) + conv(16, 8, 3) + linear(embedding, 8) + group_norm(8) + conv(8, 8, 3)
               + conv(16, 8, 1))
        + group_norm(8) + conv(8, 1, 3)  # output
    )
    assert UNet(config).num_parameters() == expected
