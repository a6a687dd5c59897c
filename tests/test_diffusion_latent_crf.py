"""LatentCRF: the Field-of-Experts term is half its energy's gradient, message passing skips the sender, the update as
stated, ablations, conditioning, gradients and errors; the plan of replaced steps and the sampler around the CRF."""

import pytest
import torch

from effml.config import ConfigError
from effml.diffusion.latent_crf import CRFSchedule, LatentCRF, LatentCRFConfig, field_of_experts_term, sample_with_crf
from effml.diffusion.schedule import CLEAN, NoiseSchedule, ddim_levels, ddim_sample


def test_field_of_experts_term_is_half_the_gradient_of_its_energy():
    torch.manual_seed(0)
    field = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    filters = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    energy = 0.5 * torch.relu(torch.nn.functional.conv2d(field, filters, padding=1)).pow(2).sum()
    (gradient,) = torch.autograd.grad(energy, field)
    torch.testing.assert_close(field_of_experts_term(field.detach(), filters), 0.5 * gradient)


def test_messages_are_the_kernel_weighted_sum_of_the_other_positions():
    torch.manual_seed(1)
    crf = LatentCRF(LatentCRFConfig(channels=2, message_kernel=3)).double()
    field = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    kernel = crf.message_kernel.detach()
    expected = torch.zeros_like(field)
    for i in range(5):
        for j in range(5):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if (di, dj) != (0, 0) and 0 <= i + di < 5 and 0 <= j + dj < 5:
                        expected[0, :, i, j] += kernel[di + 1, dj + 1] * field[0, :, i + di, j + dj]
    torch.testing.assert_close(crf.messages(field), expected)
    impulse = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    impulse[0, :, 2, 2] = 1.0
    assert crf.messages(impulse)[0, :, 2, 2].abs().max() == 0  # no message to itself


def test_one_iteration_is_the_stated_update():
    torch.manual_seed(2)
    crf = LatentCRF(LatentCRFConfig(channels=2, iterations=1, num_classes=3)).double().eval()
    norm = crf.norms[0]
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
    latent, labels = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1])
    condition = crf.condition(labels)
    field = latent + crf.input_bias(condition)[:, :, None, None]
    update = crf.compatibility(crf.messages(field), condition) + field_of_experts_term(field, crf.expert_filters)
    expected = (update + latent - norm.running_mean[None, :, None, None]) / (
        norm.running_var[None, :, None, None] + norm.eps).sqrt() * norm.weight[None, :, None, None] \
        + norm.bias[None, :, None, None]
    torch.testing.assert_close(crf(latent, labels), expected)


def test_ablations_drop_their_term():
    torch.manual_seed(3)
    latent, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    without_experts = LatentCRF(LatentCRFConfig(higher_order=False, num_classes=4))
    without_experts(latent, labels).square().sum().backward()
    assert without_experts.expert_filters.grad is None
    unconditional = LatentCRF(LatentCRFConfig(conditional=False, num_classes=4)).eval()
    torch.testing.assert_close(unconditional(latent, labels), unconditional(latent, labels.flip(0)))
    conditional = LatentCRF(LatentCRFConfig(num_classes=4)).eval()
    torch.nn.init.normal_(conditional.condition.weight)
    assert not torch.allclose(conditional(latent, labels), conditional(latent, labels.flip(0)))
    torch.testing.assert_close(conditional(latent, None), conditional(latent, torch.full((4,), 4)))


def test_batch_independence_in_eval_mode_and_gradients_everywhere_in_training():
    torch.manual_seed(4)
    crf = LatentCRF(LatentCRFConfig(channels=2, num_classes=3))
    latent, labels = torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 2, 1, 0])
    crf(latent, labels).square().mean().backward()
    for name, parameter in crf.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    crf.eval()
    whole = crf(latent, labels)
    for row in range(5):
        torch.testing.assert_close(crf(latent[row:row + 1], labels[row:row + 1]), whole[row:row + 1])


def test_errors():
    crf = LatentCRF(LatentCRFConfig(channels=1, num_classes=3))
    with pytest.raises(ValueError, match=r"shape \(B, 1, H, W\)"):
        crf(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
        crf(torch.zeros(2, 1, 4, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        crf(torch.zeros(2, 1, 4, 4), torch.tensor([0]))
    with pytest.raises(ConfigError, match="odd positive"):
        LatentCRFConfig(message_kernel=4)
    with pytest.raises(ConfigError, match="iterations"):
        LatentCRFConfig(iterations=0)


def test_the_papers_plan_makes_33_denoiser_calls_and_the_crf_replaces_the_steps_between():
    schedule = NoiseSchedule.linear(1000)
    plan = CRFSchedule()
    assert plan.denoiser_calls == 33
    assert plan.head_levels(schedule) == ddim_levels(schedule, 40)[:32] and plan.head_levels(schedule)[-1] == 224
    assert plan.tail_levels(schedule) == [39, 19, CLEAN]
    assert plan.teacher_levels(schedule) == [224, 219, 199, 179, 159, 139, 119, 99, 79, 59, 39]
    with pytest.raises(ValueError, match="up to level"):
        CRFSchedule(coarse_steps=40, coarse_run=10, full_steps=50, resume_step=2).teacher_levels(schedule)
    with pytest.raises(ConfigError, match="below coarse_steps"):
        CRFSchedule(coarse_steps=40, coarse_run=40)


def test_sampling_with_a_crf_that_follows_the_teacher_path_is_full_ddim():
    torch.manual_seed(5)
    schedule = NoiseSchedule.linear(200)
    calls = []

    def denoiser(noisy, timesteps, labels):
        calls.append(int(timesteps[0]))
        return torch.tanh(noisy + labels.reshape(-1, 1, 1, 1)) * (timesteps.double() / 200).reshape(-1, 1, 1, 1)

    plan = CRFSchedule(coarse_steps=20, coarse_run=12, full_steps=20, resume_step=17)  # one grid on both sides
    oracle = lambda latent, labels: ddim_sample(denoiser, latent, labels, schedule,  # noqa: E731
                                                plan.teacher_levels(schedule))
    noise, labels = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    full = ddim_sample(denoiser, noise, labels, schedule, ddim_levels(schedule, 20))
    calls.clear()
    torch.testing.assert_close(sample_with_crf(denoiser, oracle, noise, labels, schedule, plan), full)
    calls.clear()
    skipped = sample_with_crf(denoiser, None, noise, labels, schedule, plan)
    assert len(calls) == plan.denoiser_calls == 15
    head = ddim_sample(denoiser, noise, labels, schedule, plan.head_levels(schedule))
    torch.testing.assert_close(skipped, ddim_sample(denoiser, head, labels, schedule, plan.tail_levels(schedule)))
