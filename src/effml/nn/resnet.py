"""ResNets (He et al., "Deep Residual Learning for Image Recognition", arXiv 1512.03385) with pluggable residuals.

Every residual block computes ``y = ReLU(residual(shortcut(x), f(x), history))`` where f is the block's conv branch
(basic: 3×3-BN-ReLU-3×3-BN; bottleneck: 1×1-BN-ReLU-3×3-BN-ReLU-1×1-BN, expansion 4), shortcut is the identity or,
where the shape changes, a strided 1×1 conv + BN, and ``residual`` comes from the residual registry (``"plain"``:
shortcut + f, the original ResNet; ``"laurel"``: LAuReL, arXiv 2411.07501). Tensors are (B, C, H, W), so a residual
that takes a ``channel_dim`` option gets ``channel_dim=1`` from the ResNet itself. Residuals that need earlier states
(LAuReL-PA) see the block inputs of the current stage only, since the shape changes between stages.

``ResNetConfig.small(...)`` gives CIFAR/MNIST-style nets (3×3 stem, no max-pool); ``ResNetConfig.resnet50()`` the
ImageNet ResNet-50 (7×7 stride-2 stem + max-pool, bottleneck blocks (3, 4, 6, 3), widths 64…512).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from effml.nn.residual import RESIDUALS, Residual, StreamHistory, build_residual, check_residual_options

__all__ = ["ResNetConfig", "ResNet"]


@dataclass(frozen=True)
class ResNetConfig:
    """Shape of a ``ResNet`` (validated; ValueError naming the bad field).

    Attributes:
        in_channels, num_classes: input channels and classes.
        widths, blocks: per stage, the branch width and the number of residual blocks (stage s > 0 halves the
            resolution in its first block).
        block: "basic" or "bottleneck" (output channels = 4 × width).
        stem: "small" (3×3 conv of stride ``stem_stride``) or "imagenet" (7×7 conv stride 2 + 3×3 max-pool stride 2).
        stem_stride: stride of the small stem (2 quarters the cost of every later layer on small images).
        residual, residual_options: residual-registry name and options (e.g. "laurel", {"variant": "rw+lr",
            "rank": 4}). A residual with a ``channel_dim`` option (LAuReL) acts on the channel axis 1 of the
            (B, C, H, W) tensors: the ResNet sets ``channel_dim=1`` itself; another value is refused.
    """

    in_channels: int = 3
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: tuple[int, ...] = (2, 2, 2)
    block: str = "basic"
    stem: str = "small"
    stem_stride: int = 1
    residual: str = "plain"
    residual_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "stem_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ResNetConfig.{name} must be a positive int, got {value!r}.")
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(f"ResNetConfig: widths {self.widths} and blocks {self.blocks} need one entry per stage "
                             "(the same non-zero number of entries).")
        if any(not isinstance(v, int) or v <= 0 for v in (*self.widths, *self.blocks)):
            raise ValueError(f"ResNetConfig: widths {self.widths} and blocks {self.blocks} must be positive ints.")
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"ResNetConfig.block must be 'basic' or 'bottleneck', got {self.block!r}.")
        if self.stem not in ("small", "imagenet"):
            raise ValueError(f"ResNetConfig.stem must be 'small' or 'imagenet', got {self.stem!r}.")
        try:
            check_residual_options(self.residual, dict(self.residual_options))
        except ValueError as error:
            raise ValueError(f"ResNetConfig.residual: {error}") from None
        self.block_residual_options()

    def block_residual_options(self) -> dict[str, Any]:
        """``residual_options`` as the blocks get them: with ``channel_dim=1`` where the residual takes that option
        (ResNet tensors are (B, C, H, W)); ValueError for a given channel_dim that is not the channel axis."""
        options = dict(self.residual_options)
        if "channel_dim" not in inspect.signature(RESIDUALS[self.residual]).parameters:
            return options
        channel_dim = options.get("channel_dim", 1)
        if isinstance(channel_dim, bool) or channel_dim not in (1, -3):
            raise ValueError(f"ResNetConfig.residual_options: channel_dim={channel_dim!r}, but ResNet tensors are "
                             f"(B, C, H, W) with the channels on axis 1; drop the option (the ResNet sets "
                             f"channel_dim=1 for {self.residual!r} itself) or pass 1.")
        return {**options, "channel_dim": 1}

    @classmethod
    def resnet50(cls, num_classes: int = 1000, **kwargs: Any) -> ResNetConfig:
        """ImageNet ResNet-50."""
        return cls(in_channels=3, num_classes=num_classes, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3),
                   block="bottleneck", stem="imagenet", **kwargs)

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class ResidualBlock(nn.Module):
    """One residual block: ``ReLU(residual(shortcut(x), branch(x), history))``; x (B, C_in, H, W) →
    (B, C_out, H/stride, W/stride)."""

    def __init__(self, c_in: int, width: int, stride: int, kind: str, residual: str, residual_options: dict[str, Any],
                 index: int) -> None:
        super().__init__()
        c_out = width * (4 if kind == "bottleneck" else 1)
        if kind == "basic":
            layers = [*_conv_bn(c_in, width, 3, stride), nn.ReLU(inplace=True), *_conv_bn(width, c_out, 3)]
        else:
            layers = [*_conv_bn(c_in, width, 1), nn.ReLU(inplace=True), *_conv_bn(width, width, 3, stride),
                      nn.ReLU(inplace=True), *_conv_bn(width, c_out, 1)]
        nn.init.zeros_(layers[-1].weight)  # zero-init the last BN gain (Goyal et al.): blocks start near identity
        self.branch = nn.Sequential(*layers)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)))
        self.residual: Residual = build_residual(residual, c_out, index, **residual_options)
        self.out_channels = c_out

    def forward(self, x: Tensor, history: StreamHistory | None = None) -> Tensor:
        stream = self.shortcut(x)
        fx = self.branch(x)
        if history is None:
            return torch.relu(self.residual(stream, fx))
        out = self.residual(stream, fx, history.recent(self.residual.history_size))
        history.push(stream)
        return torch.relu(out)


class ResNet(nn.Module):
    """Stem → stages of ``ResidualBlock``s → global average pool → linear classifier.

    ``forward(images)``: (B, in_channels, H, W) float → (B, num_classes) logits.
    Attributes: ``config``, ``stem``, ``stages`` (ModuleList of ModuleLists of blocks), ``head``.
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        first = config.widths[0]
        stem: list[nn.Module] = (_conv_bn(config.in_channels, first, 3, config.stem_stride) if config.stem == "small"
                                 else _conv_bn(config.in_channels, first, 7, 2))
        stem.append(nn.ReLU(inplace=True))
        if config.stem == "imagenet":
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        channels, index = first, 0
        residual_options = config.block_residual_options()
        self.stages = nn.ModuleList()
        for stage, (width, count) in enumerate(zip(config.widths, config.blocks, strict=True)):
            blocks = nn.ModuleList()
            for position in range(count):
                stride = 2 if stage > 0 and position == 0 else 1
                block = ResidualBlock(channels, width, stride, config.block, config.residual,
                                      dict(residual_options), index)
                blocks.append(block)
                channels, index = block.out_channels, index + 1
            self.stages.append(blocks)
        self.head = nn.Linear(channels, config.num_classes)
        self._history_size = max(b.residual.history_size for stage in self.stages for b in stage)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images)
        for stage in self.stages:
            history = StreamHistory(self._history_size) if self._history_size > 0 else None
            for block in stage:
                x = block(x, history)
        return self.head(x.mean(dim=(2, 3)))
