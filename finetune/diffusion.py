"""The denoising objective shared by every method: noise, timesteps, target, and the weighted loss.

Noise and timesteps for micro-batch m are drawn for the whole global batch from a generator seeded
by (seed, m), and each process takes its own rows. So a run is reproducible, resumable mid-way, and
gives the same samples whether it runs on one process or many.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


@dataclass
class NoisedBatch:
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def draw_noise(
    shape: tuple[int, ...],
    num_train_timesteps: int,
    seed: int,
    micro_batch: int,
    rows: slice,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for this process's `rows` of the global batch `shape`, on the CPU."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + micro_batch)
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator)
    if noise_offset:
        # Offset noise: a per-channel constant lets the model shift overall brightness.
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise[rows], timesteps[rows]


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


def per_sample_loss(
    prediction: torch.Tensor,
    batch: NoisedBatch,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error per sample, optionally Min-SNR-gamma weighted (Hang et al., 2023)."""
    loss = F.mse_loss(prediction.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return loss
    signal_to_noise = snr(scheduler, batch.timesteps)
    clipped = torch.clamp(signal_to_noise, max=snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        weight = clipped / (signal_to_noise + 1.0)
    else:
        weight = clipped / signal_to_noise
    return loss * weight
