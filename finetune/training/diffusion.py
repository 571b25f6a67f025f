"""The denoising objective shared by every diffusion method (all but vae): noise, timesteps, target, and the weighted loss.

Noise and timesteps for micro-batch m are drawn for the whole global batch from a generator seeded
by (seed, m), and each process takes its own rows. So a run is reproducible, resumable mid-way, and
draws the same noise for each image whether it runs on one process or many (m across resumes: finetune/training/draw_keys.py).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from finetune.data.loss_mask import MIN_NORMALIZING_SHARE


@dataclass
class NoisedBatch:
    """What the model sees (the noised latents at their timesteps) and what it should predict (`target`)."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


@dataclass(frozen=True)
class BatchRandomness:
    """The random draws of one micro-batch, made for the whole global batch; this process keeps `rows`.

    Each kind of draw has its own stream number, so adding a draw never shifts another one. A batch
    made of several aligned parts (DreamBooth: instance images, then their class images) has
    `copies` > 1, and each part gets draws of its own.
    """

    seed: int
    micro_batch: int
    global_batch: int
    rows: slice
    copies: int = 1

    def _generator(self, stream: int, copy: int) -> torch.Generator:
        mixed = np.random.SeedSequence([self.seed, self.micro_batch, stream, copy]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(mixed))

    def normal(self, per_sample_shape: tuple[int, ...], stream: int) -> torch.Tensor:
        """Standard normal draws of `per_sample_shape` for this process's rows (of each part, `copies`)."""
        return _joined([
            torch.randn((self.global_batch, *per_sample_shape), generator=self._generator(stream, c))[self.rows]
            for c in range(self.copies)
        ])

    def integers(self, high: int, stream: int) -> torch.Tensor:
        """One integer in [0, `high`) for each of this process's rows (of each part, `copies`)."""
        return _joined([
            torch.randint(0, high, (self.global_batch,), generator=self._generator(stream, c))[self.rows]
            for c in range(self.copies)
        ])

    def uniform(self, stream: int, index: int = 0) -> float:
        """Number `index` of `stream`: one value in [0, 1), the same for every row and process."""
        return torch.rand((), generator=self._generator(stream, index)).item()

    def for_batch_of(self, rows_here: int) -> "BatchRandomness":
        """The same draws for a batch of `rows_here` rows, made of aligned parts of this process's size."""
        local = self.rows.stop - self.rows.start
        return replace(self, copies=rows_here // local)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts' rows, one after the other; a lone part as it is (a cat of one would copy it, each draw of every step)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# Stream numbers for BatchRandomness (multi-resolution noise level i uses MULTIRES_STREAM + i).
POSTERIOR_STREAM, NOISE_STREAM, TIMESTEP_STREAM, OFFSET_STREAM, PERTURBATION_STREAM, MULTIRES_SCALE_STREAM, OFFSET_STRENGTH_STREAM = range(7)
MULTIRES_STREAM = 100


@dataclass(frozen=True)
class NoiseOptions:
    """How the training noise departs from plain Gaussian noise; every option is off by default."""

    # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
    offset: float = 0.0
    offset_random_strength: bool = False  # sd-scripts' noise_offset_random_strength: offset x U(0, 1), one draw a micro-batch
    # Multi-resolution ("pyramid") noise (Whitaker 2023, sd-scripts' multires_noise_*): coarser noise
    # added at `multires_iterations` smaller scales, each weighed by discount**level.
    multires_iterations: int = 0
    multires_discount: float = 0.3

    @classmethod
    def of(cls, train) -> "NoiseOptions":
        return cls(train.noise_offset, train.noise_offset_random_strength, train.multires_noise_iterations, train.multires_noise_discount)


def draw_noise(
    randomness: BatchRandomness, latent_shape: tuple[int, ...], timestep_range: range, options: NoiseOptions = NoiseOptions()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for this process's rows, on the CPU; `latent_shape` is per sample (C, H, W);
    the timesteps are drawn uniformly from `timestep_range` (all the model's, or train.min_timestep..max_timestep)."""
    noise = randomness.normal(latent_shape, NOISE_STREAM)
    timesteps = randomness.integers(len(timestep_range), TIMESTEP_STREAM)
    if timestep_range.start:  # train.min_timestep
        timesteps = timesteps + timestep_range.start
    if options.offset:
        strength = options.offset * (randomness.uniform(OFFSET_STRENGTH_STREAM) if options.offset_random_strength else 1.0)
        noise = noise + strength * randomness.normal((latent_shape[0], 1, 1), OFFSET_STREAM)
    if options.multires_iterations:
        noise = multires_noise(noise, randomness, options.multires_iterations, options.multires_discount)
    return noise, timesteps


def multires_noise(noise: torch.Tensor, randomness: BatchRandomness, iterations: int, discount: float) -> torch.Tensor:
    """sd-scripts' pyramid_noise_like: to `noise`, add for level i = 0..iterations-1 noise drawn at the
    size shrunk by r**i (r in [2, 4), drawn per level; down to 1x1), bilinearly upsampled and weighed by
    discount**i, then rescale to unit variance.

    Except that the variance is rescaled per sample, not over the batch: a sample's noise must not
    depend on its batch, nor on how the batch is split over processes.
    """
    channels, height, width = noise.shape[1:]
    for level in range(iterations):
        ratio = 2.0 + 2.0 * randomness.uniform(MULTIRES_SCALE_STREAM, level)
        small = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = randomness.normal((channels, *small), MULTIRES_STREAM + level)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if 1 in small:
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def draw_perturbation(randomness: BatchRandomness, latent_shape: tuple[int, ...], scale: float) -> torch.Tensor | None:
    """Input perturbation's extra noise for this process's rows (None when off): Ning et al. (2023) noise the latents
    with more than the target knows of (`add_noise`)."""
    return scale * randomness.normal(latent_shape, PERTURBATION_STREAM) if scale else None


def add_noise(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, perturbation: torch.Tensor | None = None
) -> NoisedBatch:
    """Noise `latents` to `timesteps`; the target is the model's (noise or velocity) for `noise`, also when
    the noised latents carry an input `perturbation` on top of it.

    diffusers' `add_noise` and `get_velocity`, the same products in the same order, with their square roots of alpha_bar
    and 1 - alpha_bar looked up in one table (`per_timestep`): 4 kernels a step where theirs were 8 (16 with the velocity)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction type {prediction_type!r} (use epsilon or v_prediction)")
    scales = per_timestep(scheduler, noise_scales, timesteps, latents.dtype)
    broadcast = (-1, *[1] * (latents.dim() - 1))
    signal, noise_share = scales[:, 0].view(broadcast), scales[:, 1].view(broadcast)
    noisy = signal * latents + noise_share * (noise if perturbation is None else noise + perturbation)
    target = noise if prediction_type == "epsilon" else signal * noise - noise_share * latents
    return NoisedBatch(noisy, timesteps, target)


def noise_scales(scheduler: DDPMScheduler, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at each timestep, (B, 2), in `dtype`: as diffusers' add_noise computes them."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, dtype)[timesteps]
    return torch.stack([alphas_cumprod**0.5, (1 - alphas_cumprod) ** 0.5], dim=1)


# Each scheduler's tables (`per_timestep`), dropped with it.
_TABLES: weakref.WeakKeyDictionary[DDPMScheduler, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def per_timestep(scheduler: DDPMScheduler, formula: Callable[..., torch.Tensor], timesteps: torch.Tensor, *settings) -> torch.Tensor:
    """`formula(scheduler, timesteps, *settings)`, looked up in a table of it over all of the schedule's timesteps, made
    once per scheduler, formula, device and settings: an indexing each step (one kernel launch on a GPU) where the
    formula is several (Min-SNR's weight 8). The same values: each entry is the formula's, elementwise, at its timestep
    (a DDPMScheduler's alphas_cumprod is fixed when it is made)."""
    tables = _TABLES.setdefault(scheduler, {})
    key = (formula, timesteps.device, *settings)
    if key not in tables:
        tables[key] = formula(scheduler, torch.arange(len(scheduler.alphas_cumprod), device=timesteps.device), *settings)
    return tables[key][timesteps]


def alpha_bar(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The schedule's alpha_bar (cumulative product of alphas) at each timestep: the signal's share of the noised latents' variance."""
    return scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = alpha_bar(scheduler, timesteps)
    return alphas_cumprod / (1.0 - alphas_cumprod)


def huber_threshold(scheduler: DDPMScheduler, timesteps: torch.Tensor, huber_c: float) -> torch.Tensor:
    """The pseudo-Huber loss's threshold at each timestep, on the SNR schedule of Khrapov et al. (2024), as
    sd-scripts uses it: about 1 at low noise (where it is MSE), falling to `huber_c` at high noise (where
    it grows only linearly with the error, so a few odd images pull less)."""
    alphas_cumprod = alpha_bar(scheduler, timesteps)
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c


def per_sample_loss(
    prediction: torch.Tensor,
    noised: NoisedBatch,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
    huber_c: float | None = None,
    debiased: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error per sample (with `huber_c`: the scheduled pseudo-Huber loss instead), optionally
    Min-SNR-gamma weighted (Hang et al., 2023) and/or debiased (Yu et al., 2024; see `debiased_weight`).

    `weights` (B, 1, h, w), from loss masks: each sample's mean is weighed by them per latent pixel (see
    finetune/data/loss_mask.py: normalized by the sample's weight, at least MIN_NORMALIZING_SHARE of its pixels).
    """
    if huber_c is None:
        elementwise = F.mse_loss(prediction.float(), noised.target.float(), reduction="none")
    else:
        threshold = per_timestep(scheduler, huber_threshold, noised.timesteps, huber_c).view(-1, 1, 1, 1)
        squared = (prediction.float() - noised.target.float()).square()
        elementwise = 2.0 * threshold * (torch.sqrt(squared + threshold**2) - threshold)
    if weights is None:
        loss = elementwise.mean(dim=(1, 2, 3))
    else:  # the weighted mean; a crop with little or no weight (a sliver of the subject) is not scaled up past a floor
        floor = MIN_NORMALIZING_SHARE * weights.shape[-2] * weights.shape[-1]
        total_weight = weights.sum(dim=(1, 2, 3)).clamp_min(floor) * elementwise.shape[1]
        loss = (elementwise * weights).sum(dim=(1, 2, 3)) / total_weight
    # The weights by timestep are tables (`per_timestep`): an indexing a step, where Min-SNR's formula was 8 kernels.
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    if snr_gamma is not None:
        loss = loss * per_timestep(scheduler, min_snr_weight, noised.timesteps, snr_gamma, v_prediction)
    if debiased:
        loss = loss * per_timestep(scheduler, debiased_weight, noised.timesteps, v_prediction)
    return loss


def min_snr_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma's loss weight, as diffusers' compute_snr weighting: min(SNR, gamma) / SNR for noise prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction. At SNR 0 (the last timestep of a zero-terminal-SNR schedule, which a base's
    scheduler config may ask for) noise prediction's weight is its limit, 1, not 0/0: one NaN loss would turn every weight
    to NaN at that step (diffusers' SDXL script sets these weights to 1 too)."""
    signal_to_noise = snr(scheduler, timesteps)
    clipped = torch.clamp(signal_to_noise, max=snr_gamma)
    if v_prediction:
        return clipped / (signal_to_noise + 1.0)
    return torch.where(signal_to_noise > 0, clipped / signal_to_noise, torch.ones_like(signal_to_noise))


def debiased_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation's loss weight, as sd-scripts applies it: 1/sqrt(SNR) for noise prediction,
    1/(SNR+1) for v-prediction, with the SNR capped at 1000 (it is near-infinite at timestep 0). Low-noise
    steps, which the plain loss over-weighs, count less."""
    capped = torch.clamp(snr(scheduler, timesteps), max=1000.0)
    return 1.0 / (capped + 1.0) if v_prediction else 1.0 / capped.sqrt()
