"""The training objective's options: the timestep range, Min-SNR-gamma and debiased weighting, the
scheduled pseudo-Huber loss, offset and multi-resolution noise and input perturbation, each against its formula,
and each reaching the trainer."""

import pytest
import torch
from diffusers import DDPMScheduler

import finetune.methods.base as method_base
from finetune.training.diffusion import (
    BatchRandomness, NoisedBatch, NoiseOptions, add_noise, debiased_weight, draw_noise, draw_perturbation, huber_threshold, per_sample_loss, snr,
)  # fmt: skip
from finetune.config.recipe_loading import recipe_from_dict
from finetune.errors import FinetuneError
from finetune.training.trainer import train

SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
V_SCHEDULER = DDPMScheduler.from_config(SCHEDULER.config, prediction_type="v_prediction")


def randomness(micro_batch=0, size=64, rows=None):
    return BatchRandomness(seed=0, micro_batch=micro_batch, global_batch=size, rows=rows or slice(0, size))


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


def test_min_snr_gamma_weighs_noise_prediction_at_snr_zero_by_its_limit_one_not_nan():
    """A zero-terminal-SNR schedule (a base's scheduler config may ask for one) has SNR 0 at its last timestep: min(SNR, gamma) / SNR
    was 0/0 there, a NaN loss that turned every trained weight to NaN at that step. Its limit is 1 (plain MSE)."""
    zero_snr = DDPMScheduler.from_config(SCHEDULER.config, rescale_betas_zero_snr=True)
    batch, prediction = batch_at([500, 999], 0.5)
    assert snr(zero_snr, batch.timesteps)[1] == 0
    weighted = per_sample_loss(prediction, batch, zero_snr, snr_gamma=5.0)
    assert torch.isfinite(weighted).all() and weighted[1] == pytest.approx(0.25)
    v_weighted = per_sample_loss(prediction, batch, DDPMScheduler.from_config(zero_snr.config, prediction_type="v_prediction"), snr_gamma=5.0)
    assert v_weighted[1] == 0  # min(0, gamma) / (0 + 1), as before


def test_a_base_with_a_zero_terminal_snr_schedule_trains_min_snr_and_refuses_debiased_noise_prediction(tiny_model, image_folder, tmp_path):
    import json
    import shutil

    from conftest import build_recipe

    base = shutil.copytree(tiny_model, tmp_path / "zero-snr-base")
    config_file = base / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "rescale_betas_zero_snr": True}))
    last_only = dict(train__max_steps=2, train__min_timestep=999)  # every sample at SNR 0
    result = train(build_recipe(base, image_folder, tmp_path / "min-snr", train__snr_gamma=5.0, **last_only))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(FinetuneError, match=r"train.debiased_estimation weighs each timestep's loss by 1/sqrt\(SNR\), and base model .* has SNR 0 "
                                            r"at timestep 999 .*: set model.prediction_type: v_prediction, or train.max_timestep: 999"):
        train(build_recipe(base, image_folder, tmp_path / "debiased", train__debiased_estimation=True, **last_only))
    train(build_recipe(base, image_folder, tmp_path / "debiased-v", train__debiased_estimation=True, model__prediction_type="v_prediction", **last_only))


def test_debiased_estimation_weighs_by_one_over_sqrt_snr_and_one_over_snr_plus_one_for_v():
    batch, prediction = batch_at([0, 10, 500, 990], 0.5)
    ratio = snr(SCHEDULER, batch.timesteps)
    assert torch.allclose(per_sample_loss(prediction, batch, SCHEDULER, debiased=True), 0.25 / torch.clamp(ratio, max=1000).sqrt())
    assert debiased_weight(SCHEDULER, torch.tensor([0]), False).item() == pytest.approx(1000**-0.5)  # SNR capped at t=0
    assert torch.allclose(per_sample_loss(prediction, batch, V_SCHEDULER, debiased=True), 0.25 / (torch.clamp(ratio, max=1000) + 1))
    both = per_sample_loss(prediction, batch, SCHEDULER, snr_gamma=5.0, debiased=True)
    assert torch.allclose(both, per_sample_loss(prediction, batch, SCHEDULER, snr_gamma=5.0) * debiased_weight(SCHEDULER, batch.timesteps, False))


def test_multires_noise_has_unit_variance_per_sample_more_coarse_structure_and_ignores_the_batch_split():
    shape, options = (4, 32, 32), NoiseOptions(multires_iterations=6, multires_discount=0.3)
    plain, _ = draw_noise(randomness(), shape, range(1000))
    assert torch.equal(plain, randomness().normal(shape, 1))  # off by default: the same draws as before the option
    pyramid, _ = draw_noise(randomness(), shape, range(1000), options)
    assert torch.allclose(pyramid.std(dim=(1, 2, 3)), torch.ones(64), atol=1e-5)
    # Coarse noise: each channel's mean over the image varies more than plain noise's (~1/1024), the
    # more so the less each level is discounted (measured 4x at 0.3, 200x at 0.8).
    coarse, _ = draw_noise(randomness(), shape, range(1000), NoiseOptions(multires_iterations=6, multires_discount=0.8))
    assert plain.mean(dim=(2, 3)).var() * 2 < pyramid.mean(dim=(2, 3)).var() < coarse.mean(dim=(2, 3)).var() / 10
    half, _ = draw_noise(randomness(rows=slice(32, 64)), shape, range(1000), options)  # the second process's rows
    assert torch.allclose(half, pyramid[32:], atol=1e-6)


def test_multires_noise_stops_at_1x1_so_more_iterations_change_nothing():
    """As sd-scripts (`if wn == 1 or hn == 1: break`): the level that reaches a 1-pixel side is the last, so
    train.multires_noise_iterations past it draws the same noise, bit for bit, and 10**9 costs no more."""
    shape = (4, 64, 64)
    noise = lambda iterations: draw_noise(randomness(size=4), shape, range(1000), NoiseOptions(multires_iterations=iterations))[0]
    levels = [noise(n) for n in range(1, 9)]
    last = next(n for n in range(1, 8) if torch.equal(levels[n - 1], levels[n]))  # the first count past which nothing is added
    assert 3 <= last <= 7  # a 64-pixel side shrinks by 2x to 4x a level: 1 pixel within log2(64) + 1 levels
    assert all(not torch.equal(levels[n - 1], levels[n]) for n in range(1, last))  # each level below it adds its own noise
    assert torch.equal(noise(10**9), levels[last - 1])


def sd_scripts_pyramid_noise(noise, iterations, discount):
    """sd-scripts' pyramid_noise_like (library/custom_train_functions.py), as it is written there."""
    import random

    b, c, w, h = noise.shape
    upsample = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = random.random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += upsample(torch.randn(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_multires_noise_has_sd_scripts_coarse_structure():
    """The same settings give the same amount of coarse noise as sd-scripts (its draws are other random
    numbers; the level sizes are drawn once per batch, so the comparison averages 24 batches: measured
    0.87-1.02 over three sets of them; summing the levels as sd-scripts does not gives about 2)."""
    import random

    theirs, ours = 0.0, 0.0
    for batch in range(24):
        random.seed(batch), torch.manual_seed(batch)
        theirs += sd_scripts_pyramid_noise(torch.randn(16, 4, 64, 64), 6, 0.3).mean(dim=(2, 3)).var()
        noise, _ = draw_noise(randomness(batch, size=16), (4, 64, 64), range(1000), NoiseOptions(multires_iterations=6, multires_discount=0.3))
        ours += noise.mean(dim=(2, 3)).var()
    assert 0.7 < ours / theirs < 1.4


def test_offset_noise_adds_one_constant_per_sample_and_channel():
    """train.noise_offset (nothing read it but the resume test, so it could be dropped unnoticed): the plain draws
    plus, for each sample and channel, one N(0, offset^2) value over the whole latent."""
    shape = (4, 16, 16)
    plain, timesteps = draw_noise(randomness(), shape, range(1000))
    offset, same_timesteps = draw_noise(randomness(), shape, range(1000), NoiseOptions(offset=0.1))
    shift = offset - plain
    assert torch.equal(same_timesteps, timesteps)
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over each latent channel
    assert 0.08 < shift[:, :, 0, 0].std() < 0.12 and len(set(shift[:, :, 0, 0].flatten().tolist())) == 64 * 4


def test_input_perturbation_noises_the_input_but_not_the_target():
    latents, timesteps = torch.randn(8, 4, 8, 8), torch.tensor([10, 100, 200, 300, 400, 500, 600, 900])
    noise, perturbation = torch.randn(8, 4, 8, 8), draw_perturbation(randomness(size=8), (4, 8, 8), 0.1)
    assert draw_perturbation(randomness(size=8), (4, 8, 8), 0.0) is None and 0.09 < perturbation.std() < 0.11
    for scheduler in (SCHEDULER, V_SCHEDULER):
        plain, perturbed = add_noise(scheduler, latents, noise, timesteps), add_noise(scheduler, latents, noise, timesteps, perturbation)
        assert torch.equal(perturbed.target, plain.target)
        assert torch.allclose(perturbed.noisy_latents, scheduler.add_noise(latents, noise + perturbation, timesteps))
        assert not torch.allclose(perturbed.noisy_latents, plain.noisy_latents)


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
    monkeypatch.setattr(method_base, "add_noise", lambda s, latents, noise, timesteps, *rest: drawn.append(timesteps) or real_add_noise(s, latents, noise, timesteps, *rest))
    narrow = train(make_recipe(train__max_steps=2, train__min_timestep=500, train__max_timestep=510))
    assert drawn and all(500 <= t < 510 for batch in drawn for t in batch.tolist())
    mse, huber = (train(make_recipe(train__max_steps=2, output_dir=str(narrow.output_dir) + f"-{loss}", train__loss=loss)).losses for loss in ("mse", "huber"))
    assert narrow.losses != mse
    assert all(h < m for h, m in zip(huber, mse))  # the same draws; pseudo-Huber is below the squared error
    for option, value in {"debiased_estimation": True, "multires_noise_iterations": 4, "input_perturbation": 0.1, "noise_offset": 0.1,
                          "snr_gamma": 0.01}.items():
        # One step: its loss is the first of a longer run's (the same batch and draws, before any update).
        changed = train(make_recipe(train__max_steps=1, output_dir=str(narrow.output_dir) + f"-{option}", **{f"train__{option}": value}))
        assert changed.losses[0] != mse[0], option
    assert changed.losses[0] < mse[0]  # Min-SNR weighs each loss by min(SNR, gamma) / SNR <= 1 (0.01: below the SNR of a timestep drawn here)


def test_a_timestep_range_the_model_does_not_have_is_one_line(make_recipe):
    with pytest.raises(FinetuneError, match=r"train.max_timestep 1200 is beyond the base model's 1000 training timesteps: set at most 1000"):
        train(make_recipe(train__max_timestep=1200))
    with pytest.raises(FinetuneError, match=r"train.min_timestep 1000 leaves no timestep below the base model's 1000: set it lower"):
        train(make_recipe(train__min_timestep=1000))


def test_a_timestep_range_the_model_does_not_have_is_said_before_the_data_check(tiny_model, image_folder, tmp_path, capsys):
    """It was refused once the base had loaded, after the data check (and its minutes of decoding): the base's scheduler config says its timesteps."""
    import json
    import shutil

    from finetune.cli.main import main

    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "0000.png").write_bytes(b"cut short")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": str(tiny_model)}, "data": {"image_dir": str(data), "resolution": 64},
                                  "train": {"max_timestep": 1200}, "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}}))  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: train.max_timestep 1200 is beyond the base model's 1000 training timesteps: set at most 1000"]


def test_offset_noise_of_random_strength_scales_the_offset_by_one_uniform_draw_a_batch():
    """sd-scripts' noise_offset_random_strength: the offset of test_offset_noise_... times one U(0, 1) value for the micro-batch;
    the noise and timesteps are the same draws, and without the switch the offset is as before."""
    from finetune.training.diffusion import OFFSET_STRENGTH_STREAM

    shape = (4, 16, 16)
    plain, timesteps = draw_noise(randomness(), shape, range(1000))
    full, _ = draw_noise(randomness(), shape, range(1000), NoiseOptions(offset=0.1))
    drawn, same_timesteps = draw_noise(randomness(), shape, range(1000), NoiseOptions(offset=0.1, offset_random_strength=True))
    strength = randomness().uniform(OFFSET_STRENGTH_STREAM)
    assert 0.0 < strength < 1.0 and torch.equal(same_timesteps, timesteps)
    assert torch.allclose(drawn - plain, (full - plain) * strength, atol=1e-6)
    with pytest.raises(FinetuneError, match=r"train.noise_offset_random_strength draws the strength of offset noise, which is off: set train.noise_offset"):
        recipe_from_dict({"data": {"image_dir": "x"}, "train": {"noise_offset_random_strength": True}})


def test_the_trainer_draws_offsets_of_random_strength(make_recipe, monkeypatch):
    """One step (the same batch and draws) without offset, with it, and with the switch: the trainer's noise with the
    switch is the plain noise plus the full offset times one strength in (0, 1). (Only that its loss differed from the
    full offset's was checked, which an offset dropped altogether under the switch passed too.)"""
    noises, draw = [], method_base.draw_noise

    def draw_and_keep(*args):
        noise, timesteps = draw(*args)
        noises.append(noise)
        return noise, timesteps

    monkeypatch.setattr(method_base, "draw_noise", draw_and_keep)
    plain = train(make_recipe(train__max_steps=1))
    for name, settings in (("full", {}), ("drawn", {"train__noise_offset_random_strength": True})):
        train(make_recipe(train__max_steps=1, train__noise_offset=0.5, output_dir=f"{plain.output_dir}-{name}", **settings))
    assert len(noises) == 3
    plain_noise, offset, drawn_offset = noises[0], noises[1] - noises[0], noises[2] - noises[0]
    strength = (drawn_offset.sum() / offset.sum()).item()
    assert 0.0 < strength < 1.0 and torch.allclose(drawn_offset, offset * strength, atol=1e-6), strength
    assert offset.abs().max() > 0.1 * plain_noise.std()  # an offset of 0.5 was drawn at all
