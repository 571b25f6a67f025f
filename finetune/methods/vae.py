"""Training the autoencoder (KL-regularised, downsampling 8), the first stage of latent diffusion.

Only used to pretrain the toy-world base model from scratch; Stable Diffusion's own VAE stays frozen
in every fine-tuning method. The loss is reconstruction (L1 + L2 per pixel) plus `kl_weight` times the
KL divergence summed over the latent, divided by the pixels per image: the weighting of the latent
diffusion paper, whose losses are sums over pixels. Optionally a perceptual term, the paper's LPIPS in
spirit: the squared distance between a frozen network's features of input and reconstruction. Pixel
losses alone let small shapes decay into generic blobs (their colour costs few pixels); for the toy
world the perceptual network is a second toy-world classifier, trained on another seed so that the
evaluator that later scores the model is not the one the VAE was optimised against.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from finetune.errors import FinetuneError
from finetune.methods.base import TrainingMethod
from finetune.pipeline_io import save_pipeline
from finetune.sampling import tensor_to_image

PIPELINE_DIR = "pipeline"
SHIPPED_PERCEPTUAL_NETWORK = Path(__file__).resolve().parent.parent / "assets" / "toyworld_perceptual.safetensors"


class AutoencoderForTraining(torch.nn.Module):
    """One forward returning reconstruction and posterior, so DDP sees (and syncs) the whole VAE."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values: torch.Tensor, posterior_noise: torch.Tensor):
        posterior = self.vae.encode(pixel_values).latent_dist
        latents = posterior.mean + posterior.std * posterior_noise
        return self.vae.decode(latents).sample, posterior


class VAEMethod(TrainingMethod):
    name = "vae"

    def configure_model(self) -> None:
        self.base.vae.to(torch.float32).requires_grad_(True).train()
        settings = self.recipe.vae
        self.perceptual = None
        if settings.perceptual_weight:
            from finetune.toyworld.classifier import load_classifier

            path = Path(settings.perceptual_network) if settings.perceptual_network else SHIPPED_PERCEPTUAL_NETWORK
            if not path.is_file():
                raise FinetuneError(f"vae.perceptual_network {path} not found: train one with python -m finetune.toyworld.classifier --seed 1 --out {path}")
            self.perceptual = load_classifier(path).requires_grad_(False).eval().to(self.base.vae.device)
        self.model = AutoencoderForTraining(self.base.vae)
        self.preview: torch.Tensor | None = None
        # Running std of the latents: saved as 1/scaling_factor so the UNet sees unit-variance latents.
        self.latent_std = None

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {"autoencoder": self.model}

    def loss(self, modules, batch, randomness) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"]
        if self.preview is None:
            self.preview = pixels[:4].detach().cpu()
        latent_shape = (self.base.vae.config.latent_channels, pixels.shape[-2] // 8, pixels.shape[-1] // 8)
        noise = randomness.normal(latent_shape, stream=0).to(pixels.device)
        reconstruction, posterior = modules["autoencoder"](pixels, noise)
        settings = self.recipe.vae
        l1 = F.l1_loss(reconstruction.float(), pixels.float())
        l2 = F.mse_loss(reconstruction.float(), pixels.float())
        kl = posterior.kl().mean() / pixels[0].numel()
        std = posterior.mean.detach().float().std()
        self.latent_std = std if self.latent_std is None else 0.99 * self.latent_std + 0.01 * std
        loss = settings.l1_weight * l1 + settings.l2_weight * l2 + settings.kl_weight * kl
        terms = {}
        if self.perceptual is not None:
            perceptual = F.mse_loss(self.perceptual.features(reconstruction.float()), self.perceptual.features(pixels.float()))
            loss = loss + settings.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.detach()
        return {"loss": loss, "l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach(), "latent_std": std, **terms}

    def save(self, output_dir: Path, modules, metadata: dict[str, str]) -> list[Path]:
        vae = modules["autoencoder"].vae
        if self.latent_std is not None:
            vae.register_to_config(scaling_factor=float(1.0 / self.latent_std))
        return [save_pipeline(self.base, output_dir / PIPELINE_DIR, vae=vae)]

    @torch.no_grad()
    def validation_images(self, modules):
        """Two rows: training images, and their reconstructions (posterior mean, no sampling)."""
        if self.preview is None:
            return [], []
        vae = modules["autoencoder"].vae
        pixels = self.preview.to(vae.device, vae.dtype)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        return [[tensor_to_image(x) for x in pixels], [tensor_to_image(x) for x in reconstruction]], ["input", "reconstruction"]
