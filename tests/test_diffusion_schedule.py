"""DDPM forward process and DDIM sampling: exact identities with an oracle denoiser, composition of samplers."""

import math

import pytest
import torch

from effml.diffusion.schedule import (CLEAN, NoiseSchedule, ddim_levels, ddim_sample, ddim_step, denoising_loss,
                                     draw_noise)


class OracleDenoiser(torch.nn.Module):
    """Knows the clean images, so it returns the exact noise that makes x_t from them: ε = (x_t − √ᾱ x₀)/√(1 − ᾱ)."""

    def __init__(self, schedule: NoiseSchedule, clean: torch.Tensor) -> None:
        super().__init__()
        self.schedule, self.clean, self.calls = schedule, clean, 0

    def forward(self, noisy, timesteps, labels):
        self.calls += 1
        alpha = self.schedule.alpha_bar(timesteps).to(noisy.dtype).reshape(-1, 1, 1, 1)
        return (noisy - alpha.sqrt() * self.clean) / (1 - alpha).sqrt()


def test_linear_schedule_is_ddpm_and_alpha_bar_is_the_running_product():
    schedule = NoiseSchedule.linear(1000)
    assert schedule.betas[0].item() == pytest.approx(1e-4) and schedule.betas[-1].item() == pytest.approx(0.02)
    assert schedule.alpha_bar(CLEAN).item() == 1.0
    assert schedule.alpha_bar(2).item() == pytest.approx((1 - 1e-4) * (1 - schedule.betas[1].item())
                                                         * (1 - schedule.betas[2].item()), rel=1e-12)
    cosine = NoiseSchedule.cosine(1000)
    assert bool((cosine.alphas_cumprod[1:] < cosine.alphas_cumprod[:-1]).all())
    assert cosine.alpha_bar(0).item() == pytest.approx(1.0, abs=1e-3)


def test_scaled_linear_schedule_is_latent_diffusions_and_less_noisy_than_ddpms_beyond_the_first_levels():
    schedule = NoiseSchedule.scaled_linear(1000)
    roots = schedule.betas.sqrt()
    assert roots[0].item() == pytest.approx(0.00085 ** 0.5) and roots[-1].item() == pytest.approx(0.012 ** 0.5)
    torch.testing.assert_close(roots.diff(), torch.full((999,), (0.012 ** 0.5 - 0.00085 ** 0.5) / 999,
                                                         dtype=torch.float64))  # √β is evenly spaced
    less_noisy = schedule.alphas_cumprod > NoiseSchedule.linear(1000).alphas_cumprod
    assert bool(less_noisy[102:].all()) and not bool(less_noisy[:102].any())  # (its first β is 8.5× DDPM's)
    half = NoiseSchedule.scaled_linear(500)  # fewer levels: each β scaled by 1000 / T, as for DDPM's
    assert half.betas[0].item() == pytest.approx(2 * 0.00085) and half.betas[-1].item() == pytest.approx(2 * 0.012)


def test_add_noise_mixes_as_stated_for_int_and_per_example_levels():
    schedule = NoiseSchedule.linear(100)
    clean, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    levels = torch.tensor([0, 50, 99])
    noisy = schedule.add_noise(clean, noise, levels)
    for row, level in enumerate(levels.tolist()):
        alpha = schedule.alpha_bar(level).item()
        torch.testing.assert_close(noisy[row], math.sqrt(alpha) * clean[row] + math.sqrt(1 - alpha) * noise[row])
        torch.testing.assert_close(schedule.add_noise(clean, noise, level)[row], noisy[row])
    torch.testing.assert_close(schedule.add_noise(clean, noise, CLEAN), clean)


def test_trailing_levels():
    schedule = NoiseSchedule.linear(1000)
    assert ddim_levels(schedule, 4) == [999, 749, 499, 249, CLEAN]
    assert ddim_levels(schedule, 1000) == list(range(999, -1, -1)) + [CLEAN]
    assert ddim_levels(schedule, 50)[48] == 39
    for bad in (0, 1001, 2.0, True):
        with pytest.raises(ValueError, match="DDIM sampler takes"):
            ddim_levels(schedule, bad)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_step_with_the_true_noise_lands_on_the_forward_process(clip):
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000)
    clean = torch.rand(2, 1, 5, 5, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    noisy = schedule.add_noise(clean, noise, 600)
    stepped = ddim_step(schedule, noisy, noise, 600, 200, clip=clip)
    torch.testing.assert_close(stepped, schedule.add_noise(clean, noise, 200))
    torch.testing.assert_close(ddim_step(schedule, noisy, noise, 600, CLEAN, clip=clip), clean)


def test_clipping_bounds_the_clean_estimate_and_a_null_step_changes_nothing():
    schedule = NoiseSchedule.linear(1000)
    noisy, wild = torch.randn(2, 1, 4, 4, dtype=torch.float64), 5 * torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert ddim_step(schedule, noisy, wild, 300, CLEAN, clip=1.0).abs().max() <= 1.0
    assert ddim_step(schedule, noisy, wild, 300, CLEAN, clip=None).abs().max() > 1.0
    torch.testing.assert_close(ddim_step(schedule, noisy, wild, 300, 300, clip=1.0), noisy)


def test_sampling_with_an_oracle_recovers_the_images_from_any_levels():
    torch.manual_seed(1)
    schedule = NoiseSchedule.linear(1000)
    clean = (torch.rand(3, 1, 6, 6, dtype=torch.float64) * 2 - 1)
    oracle = OracleDenoiser(schedule, clean)
    start = schedule.add_noise(clean, torch.randn_like(clean), 999)
    for levels in (ddim_levels(schedule, 5), [999, 500, 10, CLEAN], [999, CLEAN]):
        oracle.calls = 0
        torch.testing.assert_close(ddim_sample(oracle, start, None, schedule, levels), clean)
        assert oracle.calls == len(levels) - 1


def test_samplers_compose_and_the_trajectory_holds_every_state():
    torch.manual_seed(2)
    schedule = NoiseSchedule.linear(200)
    model = lambda x, t, y: torch.tanh(x) * (t.double() / 200).reshape(-1, 1, 1, 1)  # noqa: E731
    start = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    levels = ddim_levels(schedule, 8)
    trajectory = []
    whole = ddim_sample(model, start, None, schedule, levels, trajectory=trajectory)
    middle = ddim_sample(model, start, None, schedule, levels[:4])
    assert torch.equal(ddim_sample(model, middle, None, schedule, levels[3:]), whole)
    assert len(trajectory) == len(levels) and torch.equal(trajectory[0], start) and torch.equal(trajectory[3], middle)
    assert torch.equal(trajectory[-1], whole)


def test_sample_refuses_bad_levels():
    schedule = NoiseSchedule.linear(100)
    model = lambda x, t, y: x  # noqa: E731
    start = torch.zeros(1, 1, 2, 2)
    for levels, message in (([50, 60], "strictly descending"), ([], "strictly descending"),
                            ([100, 5], "must lie in"), ([50, -2], "must lie in")):
        with pytest.raises(ValueError, match=message):
            ddim_sample(model, start, None, schedule, levels)


def test_denoising_loss_is_the_noise_prediction_error_at_the_drawn_levels():
    schedule = NoiseSchedule.linear(50)
    clean = torch.rand(4, 1, 3, 3) * 2 - 1
    seen = {}

    def model(noisy, timesteps, labels):
        seen.update(noisy=noisy, timesteps=timesteps, labels=labels)
        return torch.zeros_like(noisy)

    levels, noise = draw_noise(schedule, clean.shape, torch.Generator().manual_seed(3))
    again = draw_noise(schedule, clean.shape, torch.Generator().manual_seed(3))
    assert torch.equal(levels, again[0]) and torch.equal(noise, again[1])
    assert levels.shape == (4,) and bool(((levels >= 0) & (levels < 50)).all())
    loss = denoising_loss(model, schedule, clean, torch.arange(4), levels, noise)
    assert torch.equal(seen["timesteps"], levels) and torch.equal(seen["labels"], torch.arange(4))
    torch.testing.assert_close(seen["noisy"], schedule.add_noise(clean, noise, levels))
    torch.testing.assert_close(loss, noise.pow(2).mean())  # a zero prediction misses by the whole noise


def test_schedule_refuses_bad_betas():
    for betas in (torch.tensor([0.1]), torch.tensor([0.1, 1.0]), torch.tensor([0.0, 0.5])):
        with pytest.raises(ValueError, match="each in \\(0, 1\\)"):
            NoiseSchedule(betas)
