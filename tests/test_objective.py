"""The training objective's options: the timestep range, Min-SNR-gamma weighting and the scheduled
pseudo-Huber loss, each against its formula, and each reaching the trainer."""

import pytest
import torch
from diffusers import DDPMScheduler

import finetune.methods.base as method_base
from finetune.diffusion import BatchRandomness, NoisedBatch, draw_noise, huber_threshold, per_sample_loss, snr
from finetune.errors import FinetuneError
from finetune.trainer import train

SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def randomness(micro_batch=0, size=64):
    return BatchRandomness(seed=0, micro_batch=micro_batch, global_batch=size, rows=slice(0, size))


def test_timesteps_are_drawn_from_the_range_and_all_of_them_by_default():
    _, default = draw_noise(randomness(), (4, 2, 2), range(1000))
    assert torch.equal(default, randomness().integers(1000, 2))  # the same draws as before the range existed
    _, narrow = draw_noise(randomness(), (4, 2, 2), range(500, 510))
    assert narrow.min() >= 500 and narrow.max() < 510 and len(set(narrow.tolist())) > 5


def batch_at(timesteps, error):
    target = torch.zeros(len(timesteps), 4, 2, 2)
    return NoisedBatch(noisy_latents=target, timesteps=torch.tensor(timesteps), target=target), target + error


def test_min_snr_gamma_weighs_each_sample_by_min_snr_gamma_over_snr():
    batch, prediction = batch_at([10, 500, 990], 0.5)
    weighted = per_sample_loss(prediction, batch, SCHEDULER, snr_gamma=5.0)
    ratio = snr(SCHEDULER, batch.timesteps)
    assert torch.allclose(weighted, 0.25 * torch.clamp(ratio, max=5.0) / ratio)
    assert weighted[0] < 0.25 and torch.isclose(weighted[2], torch.tensor(0.25))  # low noise weighed down, high noise as MSE


def test_pseudo_huber_is_mse_for_small_errors_at_low_noise_and_linear_for_large_ones_at_high_noise():
    threshold = huber_threshold(SCHEDULER, torch.tensor([0, 999]), 0.1)
    assert 0.9 < threshold[0] <= 1.0 and 0.1 <= threshold[1] < 0.11
    small, prediction = batch_at([0], 0.01)
    assert torch.allclose(per_sample_loss(prediction, small, SCHEDULER, huber_c=0.1), per_sample_loss(prediction, small, SCHEDULER), rtol=1e-3)
    losses = [per_sample_loss(p, b, SCHEDULER, huber_c=0.1).item() for b, p in (batch_at([999], 10.0), batch_at([999], 20.0))]
    assert 1.9 < losses[1] / losses[0] < 2.1  # MSE would give 4: an outlier pulls linearly, not quadratically
    c = threshold[1]
    assert losses[0] == pytest.approx((2 * c * (torch.sqrt(100 + c**2) - c)).item(), rel=1e-5)


def test_the_trainer_draws_from_the_range_and_uses_the_huber_loss(make_recipe, monkeypatch):
    drawn = []
    real_add_noise = method_base.add_noise
    monkeypatch.setattr(method_base, "add_noise", lambda s, latents, noise, timesteps: drawn.append(timesteps) or real_add_noise(s, latents, noise, timesteps))
    narrow = train(make_recipe(train__max_steps=2, train__min_timestep=500, train__max_timestep=510))
    assert drawn and all(500 <= t < 510 for batch in drawn for t in batch.tolist())
    mse, huber = (train(make_recipe(train__max_steps=2, output_dir=str(narrow.output_dir) + f"-{loss}", train__loss=loss)).losses for loss in ("mse", "huber"))
    assert narrow.losses != mse
    assert all(h < m for h, m in zip(huber, mse))  # the same draws; pseudo-Huber is below the squared error


def test_a_timestep_range_the_model_does_not_have_is_one_line(make_recipe):
    with pytest.raises(FinetuneError, match=r"train.max_timestep 1200 is beyond the base model's 1000 training timesteps: set at most 1000"):
        train(make_recipe(train__max_timestep=1200))
