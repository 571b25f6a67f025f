"""The denoising objective shared by every method: noise, timesteps, target, and the weighted loss.

Noise and timesteps for micro-batch m are drawn for the whole global batch from a generator seeded
by (seed, m), and each process takes its own rows. So a run is reproducible, resumable mid-way, and
gives the same samples whether it runs on one process or many.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


@dataclass
class NoisedBatch:
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
        return torch.cat([
            torch.randn((self.global_batch, *per_sample_shape), generator=self._generator(stream, c))[self.rows]
            for c in range(self.copies)
        ])

    def integers(self, high: int, stream: int) -> torch.Tensor:
        return torch.cat([
            torch.randint(0, high, (self.global_batch,), generator=self._generator(stream, c))[self.rows]
            for c in range(self.copies)
        ])

    def for_batch_of(self, rows_here: int) -> "BatchRandomness":
        """The same draws for a batch of `rows_here` rows, made of aligned parts of this process's size."""
        local = self.rows.stop - self.rows.start
        return replace(self, copies=rows_here // local)


# Stream numbers for BatchRandomness.
POSTERIOR_STREAM, NOISE_STREAM, TIMESTEP_STREAM, OFFSET_STREAM = range(4)


def draw_noise(
    randomness: BatchRandomness, latent_shape: tuple[int, ...], timesteps: range, noise_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for this process's rows, on the CPU; `latent_shape` is per sample (C, H, W);
    the timesteps are drawn uniformly from the range `timesteps` (all the model's, by default)."""
    noise = randomness.normal(latent_shape, NOISE_STREAM)
    timesteps = timesteps.start + randomness.integers(len(timesteps), TIMESTEP_STREAM)
    if noise_offset:
        # Offset noise: a per-channel constant lets the model shift overall brightness.
        noise = noise + noise_offset * randomness.normal((latent_shape[0], 1, 1), OFFSET_STREAM)
    return noise, timesteps


def add_noise(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r} (use epsilon or v_prediction)")
    return NoisedBatch(noisy, timesteps, target)


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def huber_threshold(scheduler: DDPMScheduler, timesteps: torch.Tensor, huber_c: float) -> torch.Tensor:
    """The pseudo-Huber loss's threshold at each timestep, on the SNR schedule of Khrapov et al. (2024), as
    sd-scripts uses it: about 1 at low noise (where it is MSE), falling to `huber_c` at high noise (where
    it grows only linearly with the error, so a few odd images pull less)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c


def per_sample_loss(
    prediction: torch.Tensor,
    batch: NoisedBatch,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
    huber_c: float | None = None,
) -> torch.Tensor:
    """Mean squared error per sample (with `huber_c`: the scheduled pseudo-Huber loss instead), optionally
    Min-SNR-gamma weighted (Hang et al., 2023)."""
    if huber_c is None:
        loss = F.mse_loss(prediction.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
    else:
        threshold = huber_threshold(scheduler, batch.timesteps, huber_c).view(-1, 1, 1, 1)
        squared = (prediction.float() - batch.target.float()).square()
        loss = (2.0 * threshold * (torch.sqrt(squared + threshold**2) - threshold)).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return loss
    signal_to_noise = snr(scheduler, batch.timesteps)
    clipped = torch.clamp(signal_to_noise, max=snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        weight = clipped / (signal_to_noise + 1.0)
    else:
        weight = clipped / signal_to_noise
    return loss * weight
