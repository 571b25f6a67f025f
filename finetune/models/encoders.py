"""The frozen encoders: images to VAE latents, captions to text-encoder hidden states.

Also the two ways a caption's encoding departs from CLIP's own: captions longer than its 77 tokens encoded in chunks
of 75 (model.max_token_length, as sd-scripts does), and clip skip (the states of an earlier layer).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from finetune.errors import FinetuneError
from finetune.training.device_copy import to_device

TRAINED_TOKEN_LENGTHS = (75, 150, 225)  # model.max_token_length's (and sd-scripts' max_token_length's) values


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length (77 for CLIP), as Stable Diffusion was trained."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def token_chunks(tokenizer: CLIPTokenizer, prompts: list[str], chunks: int) -> torch.Tensor:
    """(len(prompts) * chunks, 77) token ids, as sd-scripts' max_token_length splits a caption: its first
    75 x `chunks` tokens, 75 per chunk, each chunk between a start token and an end token and padded."""
    width = tokenizer.model_max_length - 2  # tokens between the start and end marks
    ids = tokenizer(prompts, padding="max_length", max_length=width * chunks + 2, truncation=True, return_tensors="pt").input_ids
    rows = torch.stack([torch.cat([ids[:, :1], ids[:, 1 + i * width : 1 + (i + 1) * width], ids[:, -1:]], dim=1) for i in range(chunks)], dim=1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # Where padding is not the end token (SD2's tokenizer): a chunk full of words still ends with the end
    # token, and an empty chunk starts with it (as sd-scripts does).
    full = (rows[:, :, -2] != eos) & (rows[:, :, -2] != pad)
    rows[:, :, -1] = torch.where(full, torch.full_like(rows[:, :, -1], eos), rows[:, :, -1])
    rows[:, :, 1] = torch.where(rows[:, :, 1] == pad, torch.full_like(rows[:, :, 1], eos), rows[:, :, 1])
    return rows.reshape(-1, tokenizer.model_max_length)


def chunks_needed(tokenizer: CLIPTokenizer, prompts: list[str]) -> int:
    """How many chunks of 75 tokens hold the longest of `prompts` whole (1: it fits CLIP's own 77)."""
    longest = max(len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"])
    width = tokenizer.model_max_length - 2
    return max(1, -(-(longest - 2) // width))


def text_hidden_states(tokenizer: CLIPTokenizer, text_encoder: torch.nn.Module, prompts: list[str], device: torch.device, chunks: int = 1) -> torch.Tensor:
    """The last hidden states, which the UNet cross-attends to (with gradients, for a trained encoder).

    With `chunks` > 1 (model.max_token_length 150 or 225) each chunk is encoded on its own and the states
    joined as sd-scripts joins them: the first chunk's start, every chunk's 75 word states, the last
    chunk's end: 2 + 75 x chunks states."""
    if chunks == 1:
        return text_encoder(to_device(tokenize(tokenizer, prompts), device))[0]
    states = text_encoder(to_device(token_chunks(tokenizer, prompts, chunks), device))[0]
    states = states.reshape(len(prompts), chunks, *states.shape[1:])
    return torch.cat([states[:, 0, :1], *(states[:, i, 1:-1] for i in range(chunks)), states[:, -1, -1:]], dim=1)


def skip_last_layers(text_encoder: CLIPTextModel, clip_skip: int) -> None:
    """Leave out the text encoder's last `clip_skip - 1` layers: its output is then the earlier layer's
    through the final layer norm, which is what clip_skip means in the webui, sd-scripts and diffusers."""
    encoder = layer_stack(text_encoder)
    if not 1 <= clip_skip <= len(encoder.layers):
        raise FinetuneError(f"model.clip_skip {clip_skip}: this text encoder has {len(encoder.layers)} layers; use 1 to {len(encoder.layers)}")
    encoder.layers = encoder.layers[: len(encoder.layers) - (clip_skip - 1)]


def layer_stack(text_encoder: CLIPTextModel) -> torch.nn.Module:
    """The encoder whose `.layers` clip skip shortens: transformers 5 holds it at text_encoder.encoder,
    4.x one level down, in text_model."""
    return getattr(text_encoder, "text_model", text_encoder).encoder


@contextlib.contextmanager
def clip_skipped(text_encoder: CLIPTextModel, clip_skip: int):
    """`skip_last_layers` for the duration only (the demo's columns sample one base at different skips)."""
    encoder = layer_stack(text_encoder)
    layers = encoder.layers
    skip_last_layers(text_encoder, clip_skip)
    try:
        yield
    finally:
        encoder.layers = layers


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str], chunks: int = 1) -> torch.Tensor:
    """`text_hidden_states` of a frozen text encoder: no gradients, on the encoder's own device."""
    return text_hidden_states(tokenizer, text_encoder, prompts, text_encoder.device, chunks)


def in_autocast_dtype(states: torch.Tensor) -> torch.Tensor:
    """A frozen text encoder's hidden states in autocast's dtype, when it is on: CUDA's autocast runs CLIP's final layer
    norm in fp32, so the states came out fp32 and each cross-attention's to_k and to_v cast them again (32 kernels a step
    in SD1.5's UNet). Cast once here, they are the same values; for states no gradient flows through only."""
    device = states.device.type
    return states.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else states


@torch.no_grad()
def posterior_moments(vae: AutoencoderKL, pixel_values: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's mean and std, concatenated on the channel axis (what the latent cache keeps)."""
    posterior = vae.encode(to_device(pixel_values, vae.device, vae.dtype)).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float()


def latents_from_moments(vae: AutoencoderKL, moments: torch.Tensor, posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled fp32 latents: mean + std * noise (noise drawn by the caller, so it is reproducible), or the mean.

    `moments` may be in the VAE's half precision (the latent cache keeps them so): the fp32 noise promotes them within the
    multiply and the add, exactly (a bf16 or fp16 value is an fp32 one), the same bits as an fp32 copy of them first,
    which was an activation-sized kernel a micro-batch."""
    mean, std = moments.chunk(2, dim=1)
    latents = mean.float() if posterior_noise is None else mean + std * to_device(posterior_noise, mean.device, torch.float32)
    shift = getattr(vae.config, "shift_factor", None)
    if shift:  # SD1.5's and SDXL's VAE have none (null or 0): subtracting 0 changes no bit, but is a kernel launch per micro-batch
        latents = latents - shift
    return latents * vae.config.scaling_factor

