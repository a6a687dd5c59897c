"""A small class-conditional U-Net that predicts the noise ε of a diffusion model.

The architecture is the DDPM denoiser (Ho et al., "Denoising Diffusion Probabilistic Models", arXiv 2006.11239),
kept small, with the class conditioning of Dhariwal & Nichol ("Diffusion Models Beat GANs on Image Synthesis",
arXiv 2105.05233): a learned class embedding added to the timestep embedding.

- Conditioning: a sinusoidal embedding of the timestep (width ``base_channels``) goes through Linear → SiLU → Linear
  to width E = 4·base_channels; a learned embedding of the class label (``num_classes`` + 1 rows, the last being the
  "null" class used when no label is given, as classifier-free guidance needs) is added to it.
- Residual blocks: GroupNorm → SiLU → conv 3×3, plus a Linear projection of SiLU(embedding) added as a per-channel
  bias, then GroupNorm → SiLU → dropout → conv 3×3; a 1×1 conv on the skip path where the channel count changes.
- Down path: an input conv 3×3, then per level ``blocks_per_level`` residual blocks (each followed by self-attention
  on the levels listed in ``attention_levels``) and a stride-2 conv 3×3 between levels. Every one of these outputs
  (input conv, blocks, downsamples) is kept for a skip connection, as in DDPM.
- Middle: residual block, self-attention, residual block at the lowest resolution.
- Up path, mirrored: per level ``blocks_per_level + 1`` residual blocks, each taking the concatenation of the current
  activation and the latest kept skip, and nearest ×2 upsampling + conv 3×3 between levels.
- Output: GroupNorm → SiLU → conv 3×3 back to ``in_channels``, zero-initialised.

Shapes: ``x`` (B, C, H, W) float with C = ``in_channels`` and H = W = ``image_size``; ``timesteps`` (B,) int or
float; ``labels`` (B,) int64 in [0, num_classes] or None. Level i runs at resolution image_size / 2^i with
base_channels · channel_multipliers[i] channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.config import ConfigError, check_choice, check_distinct, check_positive, check_range

__all__ = ["UNetConfig", "UNet", "sinusoidal_timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a ``UNet``; validated on construction (ConfigError naming the field, its value and what is expected).

    Attributes:
        in_channels: image channels (also the output channels: ε has the image's shape).
        image_size: height = width of the images; divisible by 2^(levels − 1).
        base_channels: channels of level 0 and width of the sinusoidal timestep embedding (even).
        channel_multipliers: one entry per level; level i has base_channels · channel_multipliers[i] channels.
        blocks_per_level: residual blocks per level on the down path (the up path has one more per level).
        attention_levels: indices of the levels with self-attention after each residual block (the middle always
            has one).
        num_classes: number of class labels; 0 for an unconditional model.
        groups: GroupNorm groups; must divide every level's channels and be smaller than them.
        attention_heads: heads of every self-attention block; must divide the channels where attention runs.
        dropout: dropout probability inside the residual blocks, in [0, 1).
    """

    in_channels: int = 1
    image_size: int = 16
    base_channels: int = 32
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    attention_levels: tuple[int, ...] = (2,)
    num_classes: int = 10
    groups: int = 8
    attention_heads: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "base_channels", "blocks_per_level", "num_classes", "groups",
                     "attention_heads"):
            _check_int(name, getattr(self, name), allow_zero=name == "num_classes")
        if self.base_channels % 2:
            raise ConfigError(f"UNetConfig.base_channels = {self.base_channels!r} must be even: it is also the "
                              "width of the sinusoidal timestep embedding, which has one sine and one cosine per "
                              "frequency.")
        multipliers = self.channel_multipliers
        if (not isinstance(multipliers, tuple) or not multipliers
                or any(not isinstance(m, int) or isinstance(m, bool) or m <= 0 for m in multipliers)):
            raise ConfigError(f"UNetConfig.channel_multipliers = {multipliers!r} must be a non-empty tuple of "
                              "positive ints, one per level.")
        levels = len(self.channel_multipliers)
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError(f"UNetConfig.image_size = {self.image_size!r} must be divisible by 2^(levels − 1) = "
                              f"{2 ** (levels - 1)}: {levels} levels halve the resolution {levels - 1} times.")
        if not isinstance(self.attention_levels, tuple):
            raise ConfigError(f"UNetConfig.attention_levels = {self.attention_levels!r} must be a tuple of level "
                              "indices.")
        for level in self.attention_levels:
            check_choice("UNetConfig", "attention_levels", level, range(levels))
        check_distinct("UNetConfig", "attention_levels", self.attention_levels,
                       why="a level either has self-attention or not; list each level once")
        for channels in self.level_channels:
            if channels % self.groups or channels == self.groups:
                raise ConfigError(
                    f"UNetConfig.groups = {self.groups!r} does not suit a level with {channels} channels: it must "
                    f"divide every level's channels {self.level_channels} and be smaller than them (with one channel "
                    "per group, GroupNorm would remove the per-channel timestep and class bias of the residual "
                    "blocks entirely).")
        attention_channels = {self.level_channels[level] for level in self.attention_levels}
        attention_channels.add(self.level_channels[-1])  # the middle block
        for channels in sorted(attention_channels):
            if channels % self.attention_heads:
                raise ConfigError(f"UNetConfig.attention_heads = {self.attention_heads!r} must divide the channels "
                                  f"of every level with self-attention (and of the middle, the last level); "
                                  f"{channels} is not divisible by it.")
        check_range("UNetConfig", "dropout", self.dropout, 0.0, 1.0)
        if self.dropout == 1.0:
            raise ConfigError("UNetConfig.dropout = 1.0 would zero every residual branch; it must be in [0, 1).")

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level: base_channels · channel_multipliers[i]."""
        return tuple(self.base_channels * multiplier for multiplier in self.channel_multipliers)

    @property
    def embedding_dim(self) -> int:
        """Width E of the timestep (+ class) embedding fed to every residual block: 4 · base_channels."""
        return 4 * self.base_channels


def _check_int(name: str, value: object, *, allow_zero: bool = False) -> None:
    """ConfigError unless ``value`` is an int (not a bool) that is > 0 (≥ 0 with ``allow_zero``)."""
    if not isinstance(value, int) or isinstance(value, bool):
        expected = "an int ≥ 0" if allow_zero else "a positive int"
        raise ConfigError(f"UNetConfig.{name} = {value!r} is not an int; give {expected}.")
    check_positive("UNetConfig", name, value, allow_zero=allow_zero)


def sinusoidal_timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style sinusoidal embedding of (possibly fractional) timesteps: (B,) → (B, dim) float32.

    Column j < dim/2 is cos(t · ω_j) and column dim/2 + j is sin(t · ω_j), with ω_j = max_period^(−j / (dim/2)),
    frequencies from 1 down to nearly 1/max_period. ``dim`` must be even.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.to(torch.float32)[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResidualBlock(nn.Module):
    """``skip(x) + conv(dropout(SiLU(GN(conv(SiLU(GN(x))) + proj(emb)))))``;
    x (B, C_in, H, W), emb (B, E) already through SiLU → (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding_proj = nn.Linear(embedding_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.embedding_proj(embedding)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttentionBlock(nn.Module):
    """``x + proj(attention(qkv(GN(x))))`` over the H·W positions of each image; x (B, C, H, W) → (B, C, H, W)."""

    def __init__(self, channels: int, groups: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        # (B, H·W, 3·C) → three (B, heads, H·W, C / heads)
        q, k, v = self.qkv(tokens).view(batch, height * width, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, height * width, channels)
        return x + self.proj(attended).transpose(1, 2).reshape(batch, channels, height, width)


class UNetLevel(nn.Module):
    """The residual blocks of one level on one path, each followed by self-attention if the level has it;
    ``blocks[j](x, emb)`` then ``attentions[j](x)``."""

    def __init__(self, in_channels: list[int], out_channels: int, config: UNetConfig, attention: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock(channels, out_channels, config.embedding_dim, config.groups, config.dropout)
            for channels in in_channels)
        self.attentions = nn.ModuleList(
            SelfAttentionBlock(out_channels, config.groups, config.attention_heads) if attention else nn.Identity()
            for _ in in_channels)


class UNet(nn.Module):
    """The ε-prediction U-Net described in the module docstring.

    ``forward(x, timesteps, labels=None)``: x (B, C, H, W) float, timesteps (B,) int or float, labels (B,) int64 in
    [0, num_classes] (num_classes is the null class) or None (null class for all) → predicted noise (B, C, H, W).

    Attributes: ``config``, ``time_mlp``, ``class_embedding`` (None when num_classes = 0), ``input_conv``,
    ``down_levels`` / ``downsamples``, ``middle_blocks`` / ``middle_attention``, ``up_levels`` / ``upsamples``
    (deepest level first), ``output_norm``, ``output_conv``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        embedding_dim = config.embedding_dim
        self.time_mlp = nn.Sequential(nn.Linear(config.base_channels, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        self.class_embedding = (nn.Embedding(config.num_classes + 1, embedding_dim) if config.num_classes > 0
                                else None)
        self.input_conv = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)

        level_channels = config.level_channels
        last = len(level_channels) - 1
        skip_channels = [config.base_channels]  # channels of every activation kept for the up path, in order
        channels = config.base_channels
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, out_channels in enumerate(level_channels):
            inputs = [channels] + [out_channels] * (config.blocks_per_level - 1)
            self.down_levels.append(UNetLevel(inputs, out_channels, config, level in config.attention_levels))
            channels = out_channels
            skip_channels += [channels] * config.blocks_per_level
            if level < last:
                self.downsamples.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)

        self.middle_blocks = nn.ModuleList(
            ResidualBlock(channels, channels, embedding_dim, config.groups, config.dropout) for _ in range(2))
        self.middle_attention = SelfAttentionBlock(channels, config.groups, config.attention_heads)

        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(level_channels))):
            out_channels = level_channels[level]
            inputs = []
            for _ in range(config.blocks_per_level + 1):
                inputs.append(channels + skip_channels.pop())
                channels = out_channels
            self.up_levels.append(UNetLevel(inputs, out_channels, config, level in config.attention_levels))
            if level > 0:
                self.upsamples.append(nn.Conv2d(channels, channels, 3, padding=1))

        self.output_norm = nn.GroupNorm(config.groups, channels)
        self.output_conv = nn.Conv2d(channels, config.in_channels, 3, padding=1)
        # Zero init makes the untrained model predict ε̂ = 0 (loss E‖ε‖² = 1 whatever the random body computes), so
        # training starts from a calm, input-independent output; the first step moves this conv off zero, after
        # which gradients reach every layer.
        nn.init.zeros_(self.output_conv.weight)
        nn.init.zeros_(self.output_conv.bias)

    def num_parameters(self) -> int:
        """Total number of parameter elements."""
        return sum(parameter.numel() for parameter in self.parameters())

    def forward(self, x: Tensor, timesteps: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, C, H, W) float, timesteps (B,) int or float, labels (B,) int in [0, num_classes] or None →
        predicted noise ε̂ (B, C, H, W). ValueError for a shape or label that does not fit the config."""
        embedding = self._embedding(x, timesteps, labels)
        h = self.input_conv(x)
        skips = [h]
        for level, down_level in enumerate(self.down_levels):
            for block, attention in zip(down_level.blocks, down_level.attentions, strict=True):
                h = attention(block(h, embedding))
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)

        h = self.middle_blocks[0](h, embedding)
        h = self.middle_attention(h)
        h = self.middle_blocks[1](h, embedding)

        for level, up_level in enumerate(self.up_levels):
            for block, attention in zip(up_level.blocks, up_level.attentions, strict=True):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), embedding))
            if level < len(self.upsamples):
                h = self.upsamples[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.output_conv(F.silu(self.output_norm(h)))

    def _embedding(self, x: Tensor, timesteps: Tensor, labels: Tensor | None) -> Tensor:
        """Check the inputs and return SiLU(time_mlp(sinusoid(t)) + class_embedding(label)): (B, E). The SiLU is the
        one DDPM applies in every residual block before its projection, done once here for all of them."""
        config = self.config
        expected = (config.in_channels, config.image_size, config.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet: x has shape {tuple(x.shape)}; expected (B, {', '.join(map(str, expected))}) "
                             "for this config (in_channels, image_size, image_size).")
        batch = x.shape[0]
        if timesteps.shape != (batch,):
            raise ValueError(f"UNet: timesteps has shape {tuple(timesteps.shape)}; expected ({batch},), one per "
                             "image of x.")
        embedding = self.time_mlp(sinusoidal_timestep_embedding(timesteps, config.base_channels).to(x.dtype))
        null_class = config.num_classes
        if labels is not None:
            if labels.shape != (batch,) or labels.is_floating_point() or labels.is_complex():
                raise ValueError(f"UNet: labels has shape {tuple(labels.shape)} and dtype {labels.dtype}; expected "
                                 f"({batch},) integers, one per image of x.")
            if batch and (int(labels.min()) < 0 or int(labels.max()) > null_class):
                raise ValueError(f"UNet: labels must lie in [0, {null_class}] ({null_class} is the null class); got "
                                 f"values from {int(labels.min())} to {int(labels.max())}.")
        if self.class_embedding is None:  # unconditional: only the null class exists, and it carries no embedding
            return F.silu(embedding)
        if labels is None:
            labels = torch.full((batch,), null_class, dtype=torch.long, device=x.device)
        return F.silu(embedding + self.class_embedding(labels))
