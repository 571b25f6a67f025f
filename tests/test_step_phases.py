"""What the training loop dispatches in a step beside the model's forward and backward: on a GPU each operator that is not a
view is a kernel launch, and an eager step waits on the CPU's launches (docs/benchmarks-gpu.md). Counted by phase on the
tiny model (tests/step_phases.py), each phase held to what it needs."""

from __future__ import annotations

import collections

import pytest
import torch

from step_phases import StepPhases, count_step

aten = torch.ops.aten


@pytest.fixture(scope="module")
def plain_step(tiny_model, image_folder, tmp_path_factory):
    """Step 2 of a LoRA run of one process, one micro-batch a step, clipped, with a weight average."""
    from conftest import build_recipe

    recipe = build_recipe(tiny_model, image_folder, tmp_path_factory.mktemp("phases") / "run", train__max_steps=2, train__max_grad_norm=1.0,
                          train__ema_decay=0.9)  # fmt: skip
    counted, _ = count_step(recipe)
    return counted


@pytest.fixture(scope="module")
def cached_step(tiny_model, image_folder, tmp_path_factory):
    """Step 3 of a LoRA run from the latent cache (full by then: 4 images, 2 a step) under bf16 autocast, Min-SNR weighted:
    the bench's cached LoRA (`lora_cached`) with recipes/lora.yaml's train.snr_gamma."""
    from conftest import build_recipe

    recipe = build_recipe(tiny_model, image_folder, tmp_path_factory.mktemp("cached-phases") / "run", train__max_steps=3,
                          train__cache_latents=True, train__mixed_precision="bf16", train__snr_gamma=5.0)  # fmt: skip
    counted, _ = count_step(recipe, counted_step=3)
    return counted


def test_the_backward_seeds_its_gradient_and_divides_the_loss_by_nothing(plain_step):
    """accelerate divides the loss by gradient_accumulation_steps, also by 1 (a launch, and one for its gradient)."""
    assert plain_step.kernels["backward call"] == {aten.ones_like: 1}
    assert "backward of backward call" not in plain_step.kernels


def test_the_running_losses_of_a_lone_loss_add_once_a_step(plain_step):
    """StepLosses: the step's loss is the micro-batch's own; its running sum since the last log adds it (step 2 of 2)."""
    assert plain_step.kernels["running losses"] == {aten.add: 1}


def test_clipping_takes_one_norm_of_the_gradients_and_scales_them_in_one_call(plain_step):
    """torch's clip_grad_norm_: a foreach norm of every gradient, their total norm, the clip factor, one foreach multiply.
    accelerate's wrapper for sharded tensors took the norm of that one total norm again (a stack and a norm)."""
    assert plain_step.kernels["clipping"] == {aten._foreach_norm: 1, aten.stack: 1, aten.linalg_vector_norm: 1, aten.add: 1, aten.reciprocal: 1,
                                              aten.mul: 1, aten.clamp: 1, aten._foreach_mul_: 1}  # fmt: skip


def test_the_weight_average_is_one_operator(plain_step):
    """train.ema_decay: one foreach lerp of every trained weight, which no detach per parameter comes before."""
    assert plain_step.operators["weight average"] == {aten._foreach_lerp_: 1}


def test_the_draws_of_a_step_are_its_draws(plain_step):
    """The posterior's noise, the training noise and the timesteps, drawn on the host: no copy of a lone part (a cat of
    one), no timesteps shifted by a train.min_timestep of 0."""
    assert plain_step.kernels["noise and timestep draws"] == {aten.randn: 2, aten.randint: 1}


def test_draws_of_several_parts_and_from_a_minimum_timestep_are_those_drawn():
    from finetune.training.diffusion import BatchRandomness, draw_noise

    randomness = BatchRandomness(seed=5, micro_batch=3, global_batch=4, rows=slice(1, 3))
    noise, timesteps = draw_noise(randomness, (4, 2, 2), range(0, 1000))
    doubled_noise, shifted = draw_noise(randomness.for_batch_of(4), (4, 2, 2), range(100, 1100))
    assert torch.equal(doubled_noise[:2], noise) and doubled_noise.shape == (4, 4, 2, 2) and not torch.equal(doubled_noise[2:], noise)
    assert torch.equal(shifted[:2], timesteps + 100)


def kernels_of(call) -> collections.Counter:
    """The kernels that `call()` dispatches, in whatever phase."""
    counting = StepPhases()
    with counting:
        call()
    return sum(counting.kernels.values(), collections.Counter())


def test_latents_of_a_vae_without_a_shift_are_scaled_and_not_shifted():
    """SD1.5's VAE has no shift_factor (null; 0 would be the same): subtracting 0 was an activation-sized kernel a micro-batch.
    A VAE with a shift (SD3's, 0.1159) still has it subtracted before the scaling."""
    from types import SimpleNamespace

    from finetune.models.encoders import latents_from_moments

    moments, noise = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    mean, std = moments.chunk(2, dim=1)
    for shift in (None, 0.0):
        vae = SimpleNamespace(config=SimpleNamespace(shift_factor=shift, scaling_factor=0.18215))
        assert kernels_of(lambda: latents_from_moments(vae, moments, noise)) == {aten.mul: 2, aten.add: 1}
        assert torch.equal(latents_from_moments(vae, moments, noise), (mean + std * noise - 0.0) * 0.18215)
    shifted = SimpleNamespace(config=SimpleNamespace(shift_factor=0.1159, scaling_factor=1.5305))
    assert torch.equal(latents_from_moments(shifted, moments, noise), (mean + std * noise - 0.1159) * 1.5305)


def test_the_noising_of_a_step_looks_up_its_scales_once(plain_step):
    """diffusers' add_noise indexed alpha_bar twice and took two square roots and a 1 - alpha_bar each step (8 kernels);
    the square roots of both are one table now, indexed once: the two products and their sum are left."""
    assert plain_step.kernels["noising"] == {aten.index: 1, aten.mul: 2, aten.add: 1}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noising_from_the_table_is_diffusers_add_noise_and_velocity_to_the_bit(prediction_type, dtype):
    """The noised latents and the target of diffusers' add_noise and get_velocity, bit for bit, at the first and the last
    timestep too (a zero-terminal-SNR schedule's last has alpha_bar 0); the velocity is 3 kernels more, not 8."""
    from diffusers import DDPMScheduler

    from finetune.training.diffusion import add_noise

    for zero_snr in (False, True):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                                  rescale_betas_zero_snr=zero_snr)  # fmt: skip
        generator = torch.Generator().manual_seed(4)
        latents, noise = (torch.randn(16, 4, 8, 8, generator=generator).to(dtype) for _ in range(2))
        timesteps = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (14,), generator=generator)])
        noised = add_noise(scheduler, latents, noise, timesteps)  # the first call makes the table
        velocity = {aten.mul: 2, aten.sub: 1} if prediction_type == "v_prediction" else {}
        expected = collections.Counter({aten.index: 1, aten.mul: 2, aten.add: 1}) + collections.Counter(velocity)
        assert kernels_of(lambda: add_noise(scheduler, latents, noise, timesteps)) == expected
        reference = DDPMScheduler.from_config(scheduler.config)
        assert torch.equal(noised.noisy_latents, reference.add_noise(latents, noise, timesteps))
        assert torch.equal(noised.target, noise if prediction_type == "epsilon" else reference.get_velocity(latents, noise, timesteps))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_weights_by_timestep_are_an_indexing_each_with_the_formulas_values(prediction_type):
    """train.snr_gamma's Min-SNR weight was 8 kernels a micro-batch (alpha_bar, the SNR, the clamp, the division, the where of
    SNR 0), train.debiased_estimation's 7 and the Huber threshold's 9: tables by timestep now, one indexing each, their
    entries the formulas' own, to the bit (at gammas 5 and 1: a table per setting)."""
    from diffusers import DDPMScheduler

    from finetune.training.diffusion import NoisedBatch, debiased_weight, huber_threshold, min_snr_weight, per_sample_loss

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(6)
    timesteps = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (6,), generator=generator)])
    target, prediction = torch.randn(8, 4, 8, 8, generator=generator), torch.randn(8, 4, 8, 8, generator=generator)
    batch, v_prediction = NoisedBatch(target, timesteps, target), prediction_type == "v_prediction"
    plain = per_sample_loss(prediction, batch, scheduler)
    plain_kernels = kernels_of(lambda: per_sample_loss(prediction, batch, scheduler))
    for gamma in (5.0, 1.0):
        weighted = per_sample_loss(prediction, batch, scheduler, snr_gamma=gamma, debiased=True)  # the first call makes the tables
        both_weights = kernels_of(lambda: per_sample_loss(prediction, batch, scheduler, snr_gamma=gamma, debiased=True))
        assert both_weights - plain_kernels == {aten.index: 2, aten.mul: 2}  # a look-up and a multiply each
        expected = plain * min_snr_weight(scheduler, timesteps, gamma, v_prediction) * debiased_weight(scheduler, timesteps, v_prediction)
        assert torch.equal(weighted, expected)
    huber = per_sample_loss(prediction, batch, scheduler, huber_c=0.1)
    huber_kernels = kernels_of(lambda: per_sample_loss(prediction, batch, scheduler, huber_c=0.1))
    # The threshold's table, then the pseudo-Huber loss's own: the error, its square, the threshold's, and so on to the mean.
    assert huber_kernels == {aten.index: 1, aten.sub: 2, aten.pow: 2, aten.add: 1, aten.sqrt: 1, aten.mul: 2, aten.mean: 1}
    threshold = huber_threshold(scheduler, timesteps, 0.1).view(-1, 1, 1, 1)
    squared = (prediction - target).square()
    assert torch.equal(huber, (2.0 * threshold * (torch.sqrt(squared + threshold**2) - threshold)).mean(dim=(1, 2, 3)))


def test_cached_latents_are_made_from_the_cached_moments_as_they_are(cached_step):
    """The cache keeps the posterior's moments in the VAE's bf16: they were cast to fp32 (an activation-sized kernel) before
    mean + std * noise, which the fp32 noise promotes anyway; no shift of 0 (SD1.5's VAE has none). The stack is the cache's."""
    assert cached_step.kernels["cached latents"] == {aten.stack: 1, aten.mul: 2, aten.add: 1}


def test_the_min_snr_weighted_loss_of_a_step_looks_its_weight_up(cached_step):
    """The mean squared error per sample, its Min-SNR weight from the table by timestep, and the batch's mean."""
    assert cached_step.kernels["loss and its weighting"] == {aten.mse_loss: 1, aten.mean: 2, aten.index: 1, aten.mul: 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_latents_of_half_precision_moments_are_those_of_their_fp32_copy(dtype):
    from types import SimpleNamespace

    from finetune.models.encoders import latents_from_moments

    vae = SimpleNamespace(config=SimpleNamespace(shift_factor=None, scaling_factor=0.18215))
    moments, noise = torch.randn(2, 8, 4, 4).to(dtype), torch.randn(2, 4, 4, 4)
    latents = latents_from_moments(vae, moments, noise)
    assert latents.dtype == torch.float32 and torch.equal(latents, latents_from_moments(vae, moments.float(), noise))
    assert kernels_of(lambda: latents_from_moments(vae, moments, noise)) == {aten.mul: 2, aten.add: 1}
    assert torch.equal(latents_from_moments(vae, moments), moments.float().chunk(2, dim=1)[0] * 0.18215)  # the mean alone
