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
from diffusers import AutoencoderKL

from finetune.checkpoints.run_files import PIPELINE_DIR
from finetune.data_check.train_inputs import not_a_classifier, perceptual_network_file
from finetune.methods.base import TrainingMethod
from finetune.outputs.pipeline_io import save_pipeline
from finetune.sampling.grids import tensor_to_image



class AutoencoderForTraining(torch.nn.Module):
    """One forward returning reconstruction and posterior, so DDP sees (and syncs) the whole VAE."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values: torch.Tensor, posterior_noise: torch.Tensor):
        posterior = self.vae.encode(pixel_values).latent_dist
        latents = posterior.mean + posterior.std * posterior_noise
        return self.vae.decode(latents).sample, posterior


def salience(pixels: torch.Tensor) -> torch.Tensor:
    """Per-pixel distance ``(B, 1, H, W)`` from each image's median colour, scaled to [0, 1]."""
    median = pixels.flatten(2).median(dim=2).values[..., None, None]
    return (pixels - median).norm(dim=1, keepdim=True) / (2 * pixels.shape[1] ** 0.5)


def reconstruction_losses(reconstruction, pixels, salience_weight: float = 0.0):
    """(L1, L2) per pixel, averaged with weights ``1 + salience_weight * salience(pixels)``."""
    weights = 1.0 + salience_weight * salience(pixels)
    weights = weights / weights.mean(dim=(2, 3), keepdim=True)
    error = reconstruction - pixels
    return (weights * error.abs()).mean(), (weights * error.square()).mean()


def feature_maps(network: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The perceptual network's activation maps after each block (every SiLU of ``network.body``)."""
    maps, h = [], pixels
    for layer in network.body:
        h = layer(h)
        if isinstance(layer, torch.nn.SiLU):
            maps.append(h)
    return maps


def perceptual_distance(network: torch.nn.Module, reconstruction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """LPIPS without the learned weights: per-location distance of channel-normalised feature maps.

    Spatial maps, not the network's pooled feature vector: a pooled vector is matched just as well by
    a texture with the right statistics, and the decoder learns to paint such textures.
    """
    total = reconstruction.new_zeros(())
    for a, b in zip(feature_maps(network, reconstruction), feature_maps(network, pixels)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-6)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-6)
        total = total + (a - b).square().sum(dim=1).mean()
    return total


class VAEMethod(TrainingMethod):
    name = "vae"
    draws_without_prompts = True  # its grid reconstructs training images

    def check_data(self) -> None:
        # The perceptual network is small: a missing or wrong file is one line before the images are read and the model loads.
        self.perceptual = self.perceptual_network()
        super().check_data()

    def perceptual_network(self) -> torch.nn.Module | None:
        if (path := perceptual_network_file(self.recipe)) is None:
            return None
        from finetune.toyworld.classifier import load_classifier

        try:
            classifier = load_classifier(path)
        except (RuntimeError, ValueError, OSError) as err:  # another model's weights (a LoRA, a UNet), or not safetensors
            raise not_a_classifier(path, str(err).splitlines()[0][:120]) from None
        return classifier.requires_grad_(False).eval()

    def configure_model(self) -> None:
        self.base.vae.to(torch.float32).requires_grad_(True).train()
        if self.perceptual is not None:
            self.perceptual.to(self.base.vae.device)
        self.autoencoder = AutoencoderForTraining(self.base.vae)
        self.preview: torch.Tensor | None = None
        # Running std of the training images' latents (posterior means): `save` writes scaling_factor = 1 / std, so the
        # UNet trained on this VAE sees unit-variance latents.
        self.latent_std = None

    def trained_module_names(self) -> list[str]:
        return ["autoencoder"]

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {"autoencoder": self.autoencoder}

    def training_data(self, accelerator):
        dataset, collate_fn = super().training_data(accelerator)
        # The validation grid reconstructs the first four training images (as the first epoch renders them),
        # the same in a resumed run.
        first = {}  # four distinct images (repeats list an image several times in a row)
        for index, example in enumerate(dataset.examples):
            if index not in self.held_out_items and len(first) < 4:
                first.setdefault(example.source, index)
        pixels = [dataset[(index, 0)]["pixel_values"] for index in first.values()]
        self.preview = torch.stack([image for image in pixels if image.shape == pixels[0].shape])  # one bucket
        return dataset, collate_fn

    def checkpoint_state(self) -> dict:
        # A resumed run continues the running std, so it saves the scaling factor an uninterrupted one would.
        return {} if self.latent_std is None else {"latent_std": self.latent_std.item()}

    def load_checkpoint_state(self, state: dict) -> None:
        if "latent_std" in state:
            self.latent_std = torch.tensor(state["latent_std"], dtype=torch.float32)

    def loss(self, modules, batch, randomness) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"]
        training = torch.is_grad_enabled()  # a training step; held-out images are scored without gradients
        latent_shape = (self.base.vae.config.latent_channels, pixels.shape[-2] // 8, pixels.shape[-1] // 8)
        noise = randomness.normal(latent_shape, stream=0).to(pixels.device)
        reconstruction, posterior = modules["autoencoder"](pixels, noise)
        settings = self.recipe.vae
        l1, l2 = reconstruction_losses(reconstruction.float(), pixels.float(), settings.salience_weight)
        kl = posterior.kl().mean() / pixels[0].numel()
        std = posterior.mean.detach().float().std()
        if training:  # the scaling factor describes the training images' latents
            self.latent_std = std if self.latent_std is None else 0.99 * self.latent_std + 0.01 * std
        loss = settings.l1_weight * l1 + settings.l2_weight * l2 + settings.kl_weight * kl
        terms = {}
        if self.perceptual is not None:
            perceptual = perceptual_distance(self.perceptual, reconstruction.float(), pixels.float())
            loss = loss + settings.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.detach()
        return {"loss": loss, "l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach(), "latent_std": std, **terms}

    def save(self, output_dir: Path, modules, metadata: dict[str, str]) -> list[Path]:
        vae = modules["autoencoder"].vae
        if self.latent_std is not None:
            vae.register_to_config(scaling_factor=float(1.0 / self.latent_std))
        return [save_pipeline(self.base, output_dir / PIPELINE_DIR, metadata=metadata, vae=vae)]

    @torch.no_grad()
    def validation_images(self, modules):
        """Two rows: training images, and their reconstructions (posterior mean, no sampling)."""
        if self.preview is None:
            return [], []
        vae = modules["autoencoder"].vae
        pixels = self.preview.to(vae.device, vae.dtype)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        return [[tensor_to_image(x) for x in pixels], [tensor_to_image(x) for x in reconstruction]], ["input", "reconstruction"]
