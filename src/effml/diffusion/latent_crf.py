"""LatentCRF: a continuous conditional random field over a diffusion model's latent, run as a neural-network layer.

Ranasinghe, Jayasumana, Veit, Chakrabarti, Glasner, Ryoo, Ramalingam and Kumar, "LatentCRF: Continuous CRF for
Efficient Latent Diffusion" (arXiv 2412.18596). The field's variables are the latent's vectors y_i (one per spatial
position, C channels), observed through the sampler's latent x at an intermediate step and a condition c (there a
text embedding, here a class label). The energy

    E(y | x) = Σ_i ‖y_i − x_i‖²                                  (unary: stay near the observation)
             + Σ_{i,j} W^s_ij ‖W(c) y_i − W(c) y_j‖²              (pairwise: condition-dependent smoothness)
             + Σ_i Σ_m [−log φ(J_m ⋆ y)]_i,  ∂ log φ = ReLU       (higher order: a Field of Experts with filters J_m)

has the stationarity condition y_i = K⁻¹(x_i + W(c)ᵀW(c) Σ_j W^s_ij y_j + ½ Σ_m [J_m⁻ ⋆ ReLU(J_m ⋆ y)]_i), with J⁻ the
flipped filter (correlating with it is the adjoint of correlating with J, so Σ_m J_m⁻ ⋆ ReLU(J_m ⋆ y) is the gradient
of ½ Σ_m ‖ReLU(J_m ⋆ y)‖², and the ½ comes from dividing the condition by the unary term's factor 2). The layer runs
that fixed-point update in parallel for every position, ``iterations`` times (the paper: 5), with learned pieces in
place of the closed forms:

    y ← x + b(c)
    repeat:  m = W^s ⋆ y                      message passing: one k×k spatial kernel, shared by the channels,
                                                 whose centre is zero (a position sends no message to itself)
             m ← ψ_C(m, c)                    compatibility: a 1×1 MLP modulated by the condition (for W(c)ᵀW(c))
             m ← m + ½ Σ_m J_m⁻ ⋆ ReLU(J_m ⋆ y)   the Field-of-Experts term
             y ← ψ_N(m + x)                   unary term added; BatchNorm in place of K⁻¹

Each iteration has its own BatchNorm (the rest is shared): the iterates' statistics differ, and one set of running
statistics averaged over all of them would not match any of them in evaluation mode. ``higher_order=False`` and
``conditional=False`` are the paper's ablations (no Field-of-Experts term; no conditioning).

Where the layer replaces steps (``CRFSchedule``): the paper runs 31 steps of a 40-step DDIM schedule, one LatentCRF
call, then the last 2 steps of the 50-step schedule — 33 denoiser calls instead of 50. The CRF therefore jumps from the
level where the coarse schedule stopped to the level where the fine schedule resumes, and its distillation targets
(stage 2) are the deterministic DDIM trajectory between those two levels: the fine schedule's steps below the first,
down to the second (``CRFSchedule.teacher_levels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.config import ConfigError, check_positive
from effml.diffusion.schedule import NoiseSchedule, ddim_levels, ddim_sample

__all__ = ["LatentCRFConfig", "LatentCRF", "field_of_experts_term", "CRFSchedule", "sample_with_crf"]


@dataclass(frozen=True)
class LatentCRFConfig:
    """Sizes of a ``LatentCRF``. ``num_classes = 0``: no condition input."""

    channels: int = 1  # C, the latent's channels
    num_classes: int = 10
    condition_dim: int = 16  # the condition embedding's size
    compatibility_hidden: int = 32  # ψ_C's hidden width
    message_kernel: int = 3  # W^s: k×k
    experts: int = 8  # M Field-of-Experts filters ...
    expert_kernel: int = 3  # ... each k×k over the C channels
    iterations: int = 5
    higher_order: bool = True
    conditional: bool = True

    def __post_init__(self) -> None:
        owner = "LatentCRFConfig"
        for name in ("channels", "condition_dim", "compatibility_hidden", "experts", "iterations"):
            check_positive(owner, name, getattr(self, name))
        check_positive(owner, "num_classes", self.num_classes, allow_zero=True)
        for name in ("message_kernel", "expert_kernel"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
                raise ConfigError(f"{owner}.{name} = {size!r}: kernel sizes must be odd positive ints (so that a "
                                  "filter is centred on its position), e.g. 3.")


def field_of_experts_term(field: Tensor, filters: Tensor) -> Tensor:
    """½ Σ_m J_m⁻ ⋆ ReLU(J_m ⋆ y): half the gradient of ½ Σ_m ‖ReLU(J_m ⋆ y)‖² with respect to y.

    field: (B, C, H, W); filters: (M, C, k, k), k odd. Correlations are zero-padded to keep H × W, and the flipped
    correlation is ``conv_transpose2d`` with the same filters (the adjoint). Returns (B, C, H, W).
    """
    padding = filters.shape[-1] // 2
    responses = F.relu(F.conv2d(field, filters, padding=padding))
    return 0.5 * F.conv_transpose2d(responses, filters, padding=padding)


class LatentCRF(nn.Module):
    """The LatentCRF layer: ``forward(x, labels)`` maps a latent x (B, C, H, W) observed at one point of a sampler's
    trajectory, with class ids ``labels`` (B,) (or None: the unconditional null class), to the refined latent
    (B, C, H, W). See the module docstring for the update it iterates."""

    def __init__(self, config: LatentCRFConfig) -> None:
        super().__init__()
        self.config = config
        channels, width = config.channels, config.compatibility_hidden
        self.condition = nn.Embedding(config.num_classes + 1, config.condition_dim)  # + the null class
        self.input_bias = nn.Linear(config.condition_dim, channels)
        self.message_kernel = nn.Parameter(torch.randn(config.message_kernel, config.message_kernel)
                                           / config.message_kernel)
        self.compatibility_in = nn.Conv2d(channels, width, 1)
        self.compatibility_film = nn.Linear(config.condition_dim, 2 * width)
        self.compatibility_out = nn.Conv2d(width, channels, 1)
        fan_in = channels * config.expert_kernel ** 2
        self.expert_filters = nn.Parameter(torch.randn(config.experts, channels, config.expert_kernel,
                                                       config.expert_kernel) / fan_in ** 0.5)
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(config.iterations))
        centre = torch.ones(config.message_kernel, config.message_kernel)
        centre[config.message_kernel // 2, config.message_kernel // 2] = 0
        self.register_buffer("message_mask", centre, persistent=False)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def _condition(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """(B, condition_dim): the embedding of each label, of the null class for None or when unconditional."""
        null = torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        if labels is None or not self.config.conditional:
            return self.condition(null)
        if labels.shape != (batch,):
            raise ValueError(f"LatentCRF: labels must have shape ({batch},), one per latent; got "
                             f"{tuple(labels.shape)}.")
        if bool(((labels < 0) | (labels > self.config.num_classes)).any()):
            raise ValueError(f"LatentCRF: labels must lie in [0, {self.config.num_classes}] ({self.config.num_classes}:"
                             f" the null class); got {sorted(set(labels.tolist()))}.")
        return self.condition(labels)

    def messages(self, field: Tensor) -> Tensor:
        """Σ_j W^s_ij y_j for every position i: (B, C, H, W) → (B, C, H, W), the same kernel for every channel."""
        batch, channels, height, width = field.shape
        kernel = (self.message_kernel * self.message_mask)[None, None]
        flat = field.reshape(batch * channels, 1, height, width)
        return F.conv2d(flat, kernel, padding=kernel.shape[-1] // 2).reshape(field.shape)

    def compatibility(self, messages: Tensor, condition: Tensor) -> Tensor:
        """ψ_C: (B, C, H, W) messages and (B, condition_dim) condition → (B, C, H, W)."""
        scale, shift = self.compatibility_film(condition)[:, :, None, None].chunk(2, dim=1)
        hidden = self.compatibility_in(messages) * (1 + scale) + shift
        return self.compatibility_out(F.silu(hidden))

    def forward(self, latent: Tensor, labels: Tensor | None = None) -> Tensor:
        if latent.dim() != 4 or latent.shape[1] != self.config.channels:
            raise ValueError(f"LatentCRF expects latents of shape (B, {self.config.channels}, H, W); got "
                             f"{tuple(latent.shape)}.")
        condition = self._condition(labels, len(latent), latent.device)
        field = latent + self.input_bias(condition)[:, :, None, None]
        for norm in self.norms:
            update = self.compatibility(self.messages(field), condition)
            if self.config.higher_order:
                update = update + field_of_experts_term(field, self.expert_filters)
            field = norm(update + latent)
        return field


@dataclass(frozen=True)
class CRFSchedule:
    """Which denoiser steps one CRF call replaces: ``coarse_run`` steps of the ``coarse_steps``-step DDIM schedule, the
    CRF, then the ``full_steps``-step schedule from its step ``resume_step`` to the end. The paper's: 40, 31, 50, 48.
    """

    coarse_steps: int = 40
    coarse_run: int = 31
    full_steps: int = 50
    resume_step: int = 48

    def __post_init__(self) -> None:
        owner = "CRFSchedule"
        for name in ("coarse_steps", "coarse_run", "full_steps", "resume_step"):
            check_positive(owner, name, getattr(self, name))
        if self.coarse_run >= self.coarse_steps or self.resume_step >= self.full_steps:
            raise ConfigError(f"{owner}: coarse_run ({self.coarse_run}) must be below coarse_steps "
                              f"({self.coarse_steps}) and resume_step ({self.resume_step}) below full_steps "
                              f"({self.full_steps}): the denoiser runs steps on both sides of the CRF.")

    @property
    def denoiser_calls(self) -> int:
        """Denoiser calls of the whole pipeline (33 for the paper's)."""
        return self.coarse_run + self.full_steps - self.resume_step

    def head_levels(self, schedule: NoiseSchedule) -> list[int]:
        """The levels the denoiser visits before the CRF (coarse_run + 1 of them, from the noisiest)."""
        return ddim_levels(schedule, self.coarse_steps)[:self.coarse_run + 1]

    def tail_levels(self, schedule: NoiseSchedule) -> list[int]:
        """The levels the denoiser visits after the CRF, from the one the CRF's output stands for to clean."""
        return ddim_levels(schedule, self.full_steps)[self.resume_step:]

    def teacher_levels(self, schedule: NoiseSchedule) -> list[int]:
        """The DDIM path the CRF replaces: its input's level, then every level of the full schedule below it down to
        the CRF's output level. Raises ValueError when the output level is not below the input level."""
        start, end = self.head_levels(schedule)[-1], self.tail_levels(schedule)[0]
        if end >= start:
            raise ValueError(f"{self}: the CRF would jump from noise level {start} up to level {end}; choose a later "
                             "resume_step or an earlier coarse_run, so that it replaces denoising steps.")
        return [start] + [level for level in ddim_levels(schedule, self.full_steps) if end <= level < start]


@torch.no_grad()
def sample_with_crf(denoiser: nn.Module, crf: nn.Module | None, noise: Tensor, labels: Tensor | None,
                    schedule: NoiseSchedule, plan: CRFSchedule, clip: float | None = 1.0) -> Tensor:
    """Sample (B, C, H, W) images from (B, C, H, W) noise at the noisiest level: DDIM over ``plan.head_levels``, the
    CRF (None: skip it, the paper's "no CRF" ablation, which hands the head's output on as if it were at the tail's
    level), DDIM over ``plan.tail_levels``. ``labels``: (B,) class ids or None. Returns clean images."""
    latent = ddim_sample(denoiser, noise, labels, schedule, plan.head_levels(schedule), clip)
    if crf is not None:
        latent = crf(latent, labels)
    return ddim_sample(denoiser, latent, labels, schedule, plan.tail_levels(schedule), clip)
