"""The DDPM forward process, its training loss, and deterministic DDIM sampling over any descending noise levels.

Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models" (arXiv 2006.11239): with β₀ … β_{T−1} increasing and
ᾱ_t = Π_{s≤t} (1 − β_s), the noised image at level t is x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, ε ~ N(0, I), and the denoiser
ε_θ(x_t, t, c) is trained to predict ε by mean squared error (their "simple" loss, eq. 14).

Song, Meng and Ermon, "Denoising Diffusion Implicit Models" (arXiv 2010.02502), eq. 12 with σ = 0: from level t to a
lower level s,

    x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t,    x_s = √ᾱ_s x̂₀ + √(1 − ᾱ_s) ε̂,    ε̂ = ε_θ(x_t, t, c),

a deterministic map, so a sampler is fully described by the descending list of levels it visits. The level ``CLEAN``
(−1) stands for ᾱ = 1, the image itself. ``ddim_levels(n)`` spaces n steps "trailing" (Lin, Liu, Li and Yang,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891, table 2): the first step starts at
the noisiest level T − 1, which few-step schedules need.

LatentCRF (arXiv 2412.18596) composes samplers: part of one schedule, a CRF call that jumps to a lower level, the
end of another schedule. ``ddim_sample`` therefore takes the levels to visit explicitly, and a state is always "an
image at a level".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["CLEAN", "NoiseSchedule", "ddim_levels", "ddim_sample", "ddim_step", "denoising_loss", "draw_noise"]

#: The level of a clean image (ᾱ = 1): where every sampler ends.
CLEAN = -1


class NoiseSchedule:
    """β_t and ᾱ_t of a DDPM forward process with ``steps`` levels 0 … steps − 1 (float64 internally).

    ``NoiseSchedule.linear(T)`` is DDPM's β rising linearly from 1e-4 to 0.02 (for T = 1000; scaled by 1000 / T for
    other T, as improved DDPM does); ``NoiseSchedule.scaled_linear(T)`` is latent diffusion's (Stable Diffusion's): √β
    rising linearly from √0.00085 to √0.012 (endpoints scaled by 1000 / T likewise), which leaves less noise than DDPM's
    beyond the first tenth of the levels; ``NoiseSchedule.cosine(T)`` is Nichol and Dhariwal's cosine ᾱ (arXiv
    2102.09672, eq. 17, β clipped at 0.999).
    """

    def __init__(self, betas: Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"A noise schedule needs at least 2 betas, each in (0, 1); got {betas.tolist()[:8]}"
                             f"{' …' if betas.numel() > 8 else ''}.")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @classmethod
    def linear(cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        scale = 1000 / steps
        return cls(torch.linspace(beta_start * scale, beta_end * scale, steps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
        scale = 1000 / steps
        roots = torch.linspace((beta_start * scale) ** 0.5, (beta_end * scale) ** 0.5, steps, dtype=torch.float64)
        return cls(roots ** 2)

    @classmethod
    def cosine(cls, steps: int = 1000, offset: float = 0.008) -> NoiseSchedule:
        phase = (torch.arange(steps + 1, dtype=torch.float64) / steps + offset) / (1 + offset)
        alpha_bar = torch.cos(phase * torch.pi / 2) ** 2
        return cls((1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999))

    @property
    def steps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, levels: Tensor | int) -> Tensor:
        """ᾱ at ``levels`` (any shape of ints in [CLEAN, steps)), float64; ᾱ = 1 at ``CLEAN``."""
        levels = torch.as_tensor(levels, dtype=torch.long)
        if bool(((levels < CLEAN) | (levels >= self.steps)).any()):
            raise ValueError(f"Noise levels must lie in [{CLEAN}, {self.steps - 1}] ({CLEAN}: clean); got "
                             f"{sorted(set(levels.flatten().tolist()))[:8]}.")
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return padded[levels + 1]

    def add_noise(self, clean: Tensor, noise: Tensor, levels: Tensor | int) -> Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε. clean, noise: (B, …); levels: an int or (B,) ints. Returns (B, …)."""
        alpha_bar = self._per_example(self.alpha_bar(levels), clean)
        return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise

    @staticmethod
    def _per_example(values: Tensor, like: Tensor) -> Tensor:
        """(B,) or scalar float64 values as ``like``'s dtype, shaped to broadcast over its non-batch dimensions."""
        values = values.to(device=like.device, dtype=like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1))) if values.dim() else values


def denoising_loss(model: nn.Module, schedule: NoiseSchedule, clean: Tensor, labels: Tensor | None, levels: Tensor,
                   noise: Tensor) -> Tensor:
    """DDPM's simple loss ‖ε − ε_θ(x_t, t, c)‖², averaged over every element, for the given draws of t and ε.

    clean: (B, C, H, W) images in [−1, 1]; labels: (B,) class ids or None; levels: (B,) ints in [0, steps), drawn
    uniformly for the loss to be DDPM's; noise: (B, C, H, W) standard normal. The caller draws them (``draw_noise``),
    so that a data-parallel run can draw a global batch's and split it like the images. Returns a scalar.
    """
    predicted = model(schedule.add_noise(clean, noise, levels), levels, labels)
    return torch.nn.functional.mse_loss(predicted.float(), noise.float())


def draw_noise(schedule: NoiseSchedule, shape: Sequence[int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A uniform level per example (shape[0],) and standard normal noise of ``shape``, from ``generator`` (CPU)."""
    levels = torch.randint(0, schedule.steps, (shape[0],), generator=generator)
    return levels, torch.randn(tuple(shape), generator=generator)


def ddim_levels(schedule: NoiseSchedule, steps: int) -> list[int]:
    """The ``steps`` + 1 levels a ``steps``-step DDIM sampler visits, "trailing" spacing: round(T − kT/n) − 1 for
    k = 0 … n − 1, then ``CLEAN``. E.g. T = 1000, n = 4 → [999, 749, 499, 249, −1]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= schedule.steps:
        raise ValueError(f"A DDIM sampler takes between 1 and {schedule.steps} steps (the schedule's levels); "
                         f"got {steps!r}.")
    total = schedule.steps
    return [round(total - k * total / steps) - 1 for k in range(steps)] + [CLEAN]


def ddim_step(schedule: NoiseSchedule, noisy: Tensor, predicted_noise: Tensor, level: int, target_level: int,
              clip: float | None = 1.0) -> Tensor:
    """One deterministic DDIM step (σ = 0) of (B, C, H, W) images from ``level`` to the lower ``target_level``, given
    the denoiser's predicted noise (B, C, H, W). ``clip`` bounds the implied clean image x̂₀ to [−clip, clip] (the
    data's range; None: no bound), and the step then uses the noise consistent with the bounded x̂₀, so that
    x_s = √ᾱ_s x̂₀ + √(1 − ᾱ_s) ε̂ still reconstructs x_t at s = t."""
    alpha = schedule.alpha_bar(level).item()
    alpha_next = schedule.alpha_bar(target_level).item()
    clean = (noisy - (1 - alpha) ** 0.5 * predicted_noise) / alpha ** 0.5
    if clip is not None:
        clean = clean.clamp(-clip, clip)
        if alpha < 1:
            predicted_noise = (noisy - alpha ** 0.5 * clean) / (1 - alpha) ** 0.5
    return alpha_next ** 0.5 * clean + (1 - alpha_next) ** 0.5 * predicted_noise


@torch.no_grad()
def ddim_sample(model: nn.Module, noisy: Tensor, labels: Tensor | None, schedule: NoiseSchedule,
                levels: Sequence[int], clip: float | None = 1.0, trajectory: list[Tensor] | None = None) -> Tensor:
    """Run DDIM from (B, C, H, W) images at ``levels[0]`` through every level of ``levels`` (strictly descending;
    ``CLEAN`` may end it): len(levels) − 1 denoiser calls. Returns the images at ``levels[-1]``.

    ``labels``: (B,) class ids or None (the denoiser's unconditional input). ``trajectory``, when given, receives the
    state at every level visited, the start included (len(levels) tensors).
    """
    levels = [int(level) for level in levels]
    if not levels or any(high <= low for high, low in zip(levels, levels[1:], strict=False)):
        raise ValueError(f"DDIM levels must be a non-empty, strictly descending list; got {levels}.")
    schedule.alpha_bar(torch.tensor(levels))  # checks the range
    state = noisy
    if trajectory is not None:
        trajectory.append(state)
    for level, target_level in zip(levels, levels[1:], strict=False):
        timesteps = torch.full((len(state),), level, device=state.device, dtype=torch.long)
        state = ddim_step(schedule, state, model(state, timesteps, labels), level, target_level, clip)
        if trajectory is not None:
            trajectory.append(state)
    return state
