"""Diffusion: a tiny DDPM/DDIM (noise schedule, denoising loss, deterministic sampler, class-conditional U-Net) and
LatentCRF (arXiv 2412.18596), the CRF layer that replaces a sampler's last steps."""

from effml.diffusion.latent_crf import CRFSchedule, LatentCRF, LatentCRFConfig, field_of_experts_term, sample_with_crf
from effml.diffusion.schedule import (CLEAN, NoiseSchedule, ddim_levels, ddim_sample, ddim_step, denoising_loss,
                                      draw_noise)
from effml.diffusion.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "CLEAN", "NoiseSchedule", "ddim_levels", "ddim_sample", "ddim_step",
           "denoising_loss", "draw_noise", "LatentCRF", "LatentCRFConfig", "CRFSchedule", "field_of_experts_term",
           "sample_with_crf"]
