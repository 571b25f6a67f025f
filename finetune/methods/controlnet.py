"""ControlNet (Zhang et al., 2023): steer a frozen Stable Diffusion with a conditioning image.

A trainable copy of the UNet's encoder (conv_in, down blocks, mid block) reads the noisy latents plus
the conditioning image (edges, a mask, a depth-like map), and its features enter the frozen UNet's
skip connections through "zero convolutions": 1x1 convs initialised to zero, as is the last conv of
the small network that embeds the conditioning image. So right after creation the UNet with the
ControlNet attached computes exactly what the UNet alone computes, and training starts from the base
model's behaviour instead of disturbing it.

- Only the ControlNet trains (fp32); UNet, VAE and text encoder stay frozen in the weight dtype.
  `controlnet.unlock_unet_decoder` is the paper's `sd_locked=False`: the UNet's decoder (up blocks and
  the output norm + conv) trains too and is saved as a UNet folder beside the ControlNet.
- `controlnet.only_mid_control`: only the mid-block residual reaches the UNet. The down-block zero
  convs are set to zero and frozen, so the saved ControlNet behaves the same in any diffusers pipeline.
- Data are triples (image, conditioning image, caption). One crop and one flip are drawn per item from
  the (seed, epoch, index) generator and applied to both images; then a share of captions
  (`controlnet.empty_prompt_share`, 0.5 as in the paper) is emptied, so the model learns to read the
  conditioning image rather than the prompt. Conditioning images reach the ControlNet in [0, 1].
- Output: `output_dir/controlnet`, a diffusers `ControlNetModel` folder that
  `StableDiffusionControlNetPipeline` uses. Validation rows show conditioning | samples.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from finetune.captions import training_caption
from finetune.config import DataConfig, Recipe
from finetune.data import Example, item_rng, load_examples, open_dataset, open_rgb, to_tensor
from finetune.diffusion import BatchRandomness
from finetune.errors import FinetuneError
from finetune.methods.base import DiffusionMethod
from finetune.models import freeze
from finetune.sampling import build_pipeline, generate

CONTROLNET_DIR, UNET_DIR, METADATA_FILE = "controlnet", "unet", "finetune_metadata.json"
# The UNet parts that train with unlock_unet_decoder (the original's output_blocks and out).
DECODER_PARTS = ("up_blocks", "conv_norm_out", "conv_out")


@dataclass(frozen=True)
class Pair:
    """A training image and its conditioning image (the caption is the image example's)."""

    image: Example
    conditioning: Example


# ---------------------------------------------------------------------------------------------------
# Data


def load_pairs(recipe: Recipe) -> list[Pair]:
    """Read (image, conditioning, caption) triples and check every pair; one-line errors name the row or file."""
    config, settings = recipe.data, recipe.controlnet
    if config.dataset is not None:
        dataset = open_dataset(config)
        column = settings.conditioning_column
        if column not in dataset.column_names:
            raise FinetuneError(
                f"dataset {config.dataset} has no conditioning column '{column}' (controlnet.conditioning_column); "
                f"its columns are: {', '.join(dataset.column_names)}"
            )
        examples = load_examples(config, check=False)
        conditionings = dataset.select_columns([column])
        pairs = [
            Pair(example, Example(f"{example.source} column '{column}'", "", lambda row=row: conditionings[row][column]))
            for row, example in enumerate(examples)
        ]
    else:
        examples = load_examples(config, check=False)
        folder = Path(config.image_dir)
        files = _conditioning_files(folder)
        pairs = []
        for example in examples:
            name = Path(example.source).name
            if name not in files:
                raise FinetuneError(
                    f"image {example.source} has no conditioning image: give it a conditioning_file_name in "
                    f"{folder / 'metadata.jsonl'} (finetune make-conditions writes one)"
                )
            path = folder / files[name]
            if not path.is_file():
                raise FinetuneError(f"conditioning image {path} of image {example.source} not found: fix its conditioning_file_name in metadata.jsonl")
            pairs.append(Pair(example, Example(str(path), "", lambda p=path: Image.open(p))))
    check_pairs(pairs, config.min_image_size or config.resolution // 2)
    return pairs


def _conditioning_files(folder: Path) -> dict[str, str]:
    """{image file name: conditioning file name relative to the folder} from metadata.jsonl."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise FinetuneError(
            f"data folder {folder} has no metadata.jsonl naming conditioning images (file_name, conditioning_file_name, text): "
            "write one, or make one with finetune make-conditions"
        )
    files = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row.get("conditioning_file_name"):
                files[Path(row["file_name"]).name] = str(row["conditioning_file_name"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise FinetuneError(f"{path} line {line_number}: expected a JSON object with 'file_name', 'conditioning_file_name' and 'text'") from None
    return files


def check_pairs(pairs: list[Pair], min_size: int) -> None:
    """Decode both images of every pair: readable, large enough, and of the same size."""
    for pair in pairs:
        image = open_rgb(pair.image)
        if min(image.size) < min_size:
            raise FinetuneError(
                f"image {pair.image.source} is {image.size[0]}x{image.size[1]}, smaller than {min_size} px on its short side: "
                "remove it, or lower data.min_image_size"
            )
        conditioning = open_rgb(pair.conditioning)
        if conditioning.size != image.size:
            raise FinetuneError(
                f"conditioning image {pair.conditioning.source} is {conditioning.size[0]}x{conditioning.size[1]} but image "
                f"{pair.image.source} is {image.size[0]}x{image.size[1]}: they must be the same size (one crop is cut from both)"
            )


def paired_views(image: Image.Image, conditioning: Image.Image, config: DataConfig, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Resize both to the resolution (short side), then cut ONE crop and apply ONE flip to both.

    The draws are those `data.prepare_image` makes (crop offsets, then the flip), so the image view is
    the one a LoRA run would see; the conditioning view is the same geometry.
    """
    resolution = config.resolution
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    views = [im.resize(size, Image.Resampling.LANCZOS) for im in (image, conditioning)]
    extra_x, extra_y = size[0] - resolution, size[1] - resolution
    if config.crop == "random":
        left, top = int(rng.integers(0, extra_x + 1)), int(rng.integers(0, extra_y + 1))
    else:
        left, top = extra_x // 2, extra_y // 2
    views = [view.crop((left, top, left + resolution, top + resolution)) for view in views]
    if config.random_flip and rng.random() < 0.5:
        views = [ImageOps.mirror(view) for view in views]
    return views[0], views[1]


def conditioning_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1], the range diffusers' ControlNet pipelines feed the ControlNet."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ControlNetDataset(Dataset):
    """Item (index, epoch): the pair's views, drawn from the (seed, epoch, index) generator."""

    def __init__(self, pairs: list[Pair], config: DataConfig, seed: int, empty_prompt_share: float):
        self.pairs, self.config, self.seed, self.empty_prompt_share = pairs, config, seed, empty_prompt_share

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        pair = self.pairs[index]
        rng = item_rng(self.seed, epoch, index)
        image, conditioning = paired_views(open_rgb(pair.image), open_rgb(pair.conditioning), self.config, rng)
        caption = training_caption(pair.image.caption, self.config.shuffle_tags, self.config.keep_tokens, self.seed, epoch, index)
        if self.empty_prompt_share > 0 and rng.random() < self.empty_prompt_share:
            caption = ""
        return {"pixel_values": to_tensor(image), "conditioning_pixel_values": conditioning_tensor(conditioning), "caption": caption, "index": index}


def controlnet_collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "conditioning_pixel_values": torch.stack([item["conditioning_pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "indices": torch.tensor([item["index"] for item in items]),
    }


# ---------------------------------------------------------------------------------------------------
# The method


class ControlNetMethod(DiffusionMethod):
    name = "controlnet"

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.settings = recipe.controlnet
        self.controlnet: ControlNetModel | None = None

    def check_data(self) -> None:
        data = self.recipe.data
        # Pairs share one crop of one size, read from one folder's metadata.jsonl.
        if data.bucketing.enabled or data.folders:
            raise FinetuneError("method controlnet does not support data.bucketing or data.folders yet: remove them from the recipe")
        self.pairs = load_pairs(self.recipe)
        for path in self.settings.validation_conditions:
            if not Path(path).is_file():
                raise FinetuneError(f"validation conditioning image {path} not found: check controlnet.validation_conditions")
            open_rgb(Example(path, "", lambda p=path: Image.open(p)))
        pretrained = self.settings.pretrained
        if pretrained is not None:
            path = Path(pretrained).expanduser()
            looks_like_hub_id = pretrained.count("/") == 1 and not pretrained.startswith((".", "/", "~")) and not path.exists()
            if not looks_like_hub_id and not (path / "config.json").is_file():
                raise FinetuneError(
                    f"ControlNet {pretrained} not found: controlnet.pretrained must be a diffusers ControlNet folder "
                    "(with config.json), a hub id, or null to start from the UNet"
                )

    def training_data(self, accelerator):
        return ControlNetDataset(self.pairs, self.recipe.data, self.recipe.seed, self.settings.empty_prompt_share), controlnet_collate

    # -- model --------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        unet = self.base.unet
        # Copy the encoder while the UNet is still fp32 (a copy of bf16-rounded weights would be worse).
        self.controlnet = self._load_or_create(unet)
        freeze(unet, self.weight_dtype)
        # The trainer moves only what trains (and the frozen encoders); the locked UNet goes where they are.
        unet.to(self.base.vae.device)
        self.controlnet.to(self.base.vae.device).requires_grad_(True).train()  # created/loaded in fp32
        if self.settings.only_mid_control:
            with torch.no_grad():
                for block in self.controlnet.controlnet_down_blocks:
                    block.weight.zero_()
                    block.bias.zero_()
            self.controlnet.controlnet_down_blocks.requires_grad_(False)
        if self.settings.unlock_unet_decoder:
            unet.train()
            for part in DECODER_PARTS:
                getattr(unet, part).to(torch.float32).requires_grad_(True)
        if self.recipe.train.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()

    def _load_or_create(self, unet) -> ControlNetModel:
        pretrained = self.settings.pretrained
        if pretrained is None:
            # Random init of the conditioning embedding from the global RNG, which the trainer seeded.
            return ControlNetModel.from_unet(unet)
        try:
            controlnet = ControlNetModel.from_pretrained(pretrained, torch_dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise FinetuneError(f"could not load ControlNet {pretrained}: {str(err).splitlines()[0][:200]}") from None
        for key in ("block_out_channels", "cross_attention_dim", "in_channels", "down_block_types", "layers_per_block"):
            mine, theirs = controlnet.config.get(key), unet.config.get(key)
            if mine is not None and theirs is not None and list(np.atleast_1d(mine)) != list(np.atleast_1d(theirs)):
                raise FinetuneError(f"ControlNet {pretrained} does not fit base model {self.base.source}: its {key} is {mine}, the UNet's {theirs}")
        return controlnet

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"controlnet": self.controlnet}
        if self.settings.unlock_unet_decoder:
            modules["unet"] = self.base.unet
        return modules

    def predict(self, modules, noisy_latents, timesteps, encoder_hidden_states, batch) -> torch.Tensor:
        conditioning = batch["conditioning_pixel_values"].to(noisy_latents.device)
        down, mid = modules["controlnet"](
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=conditioning,
            conditioning_scale=batch.get("conditioning_scale", 1.0),
            return_dict=False,
        )
        if self.settings.only_mid_control:
            down = [torch.zeros_like(residual) for residual in down]
        # In the frozen weights' dtype, as the UNet's own features (accelerate hands fp32 outputs back).
        down, mid = [residual.to(self.weight_dtype) for residual in down], mid.to(self.weight_dtype)
        unet = modules.get("unet", self.base.unet)
        return unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    # -- output -------------------------------------------------------------------------------------

    def save(self, output_dir: Path, modules, metadata: dict[str, str]) -> list[Path]:
        paths = [save_model_folder(modules["controlnet"], output_dir / CONTROLNET_DIR, metadata)]
        if "unet" in modules:
            paths.append(save_model_folder(modules["unet"], output_dir / UNET_DIR, metadata))
        return paths

    def pipeline(self, modules) -> StableDiffusionControlNetPipeline:
        return build_pipeline(
            self.base, unet=modules.get("unet"), pipeline_class=StableDiffusionControlNetPipeline, controlnet=modules["controlnet"]
        )

    def validation_conditions(self) -> list[Image.Image]:
        """Conditioning views (resized, center-cropped) for validation: the recipe's images, or the
        first training examples' conditioning images, one per validation prompt."""
        config = self.recipe.data.model_copy(update={"crop": "center", "random_flip": False})
        paths = self.settings.validation_conditions
        if paths:
            images = [open_rgb(Example(p, "", lambda p=p: Image.open(p))) for p in paths]
            return [paired_views(image, image, config, np.random.default_rng(0))[1] for image in images]
        count = len(self.recipe.validation.prompts)
        pairs = [self.pairs[i % len(self.pairs)] for i in range(count)]
        return [paired_views(open_rgb(p.image), open_rgb(p.conditioning), config, np.random.default_rng(0))[1] for p in pairs]

    def validation_images(self, modules) -> tuple[list[list[Image.Image]], list[str]]:
        """One row per (conditioning, prompt) pair: the conditioning image, then the samples."""
        settings = self.recipe.validation
        if not settings.prompts:
            return [], []
        conditions = self.validation_conditions()
        prompts = list(settings.prompts)
        rows_count = max(len(conditions), len(prompts))
        conditions = conditions * rows_count if len(conditions) == 1 else conditions
        prompts = prompts * rows_count if len(prompts) == 1 else prompts
        pipeline = self.pipeline(modules)
        scale = self.settings.conditioning_scale
        rows, labels = [], []
        with residuals_in(modules["controlnet"], self.weight_dtype):
            for condition, prompt in zip(conditions, prompts):
                samples = generate(
                    pipeline, [prompt], settings.images_per_prompt, settings.seed, settings.num_inference_steps,
                    settings.guidance_scale, self.recipe.data.resolution, image=condition, controlnet_conditioning_scale=scale,
                )[0]
                rows.append([condition, *samples])
                labels.append(prompt if scale == 1.0 else f"{prompt} (control x{scale:g})")
        return rows, labels

    # -- measuring control --------------------------------------------------------------------------

    def fixed_batch(self, indices: list[int], empty_prompts: bool = False) -> dict:
        """Examples `indices` as a batch, center-cropped and unflipped, with their captions (or "")."""
        config = self.recipe.data.model_copy(update={"crop": "center", "random_flip": False})
        dataset = ControlNetDataset(self.pairs, config, self.recipe.seed, empty_prompt_share=0.0)
        batch = controlnet_collate([dataset[(i, 0)] for i in indices])
        if empty_prompts:
            batch["captions"] = [""] * len(indices)
        return batch


@contextlib.contextmanager
def residuals_in(controlnet: torch.nn.Module, dtype: torch.dtype):
    """While sampling, hand the ControlNet's residuals to the UNet in `dtype` (the frozen weights').

    Under mixed precision accelerate's wrapper returns fp32 outputs, and fp32 features meeting
    half-precision norm weights fail on the CPU; the training loss casts the same way in `predict`.
    """

    def cast(module, args, output):
        if isinstance(output, tuple):
            down, mid = output
            return [residual.to(dtype) for residual in down], mid.to(dtype)
        output.down_block_res_samples = [residual.to(dtype) for residual in output.down_block_res_samples]
        output.mid_block_res_sample = output.mid_block_res_sample.to(dtype)
        return output

    handle = controlnet.register_forward_hook(cast)
    try:
        yield
    finally:
        handle.remove()


def save_model_folder(model: torch.nn.Module, folder: Path, metadata: dict[str, str]) -> Path:
    """`model.save_pretrained` in fp32, written beside `folder` and renamed into place."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dtypes = [p.dtype for p in model.parameters()]
    try:
        for parameter in model.parameters():
            parameter.data = parameter.data.float()
        model.save_pretrained(partial, safe_serialization=True)
    finally:
        for parameter, dtype in zip(model.parameters(), dtypes):
            parameter.data = parameter.data.to(dtype)
    (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


@torch.no_grad()
def control_use_score(method: ControlNetMethod, modules: dict, batch: dict, seed: int = 0) -> dict[str, float]:
    """How much the model uses its conditioning, from three losses with the same noise and timesteps.

    `right`: the batch's own conditioning images; `shuffled`: each row gets the next row's (a fixed
    derangement; the batch needs two or more distinct conditionings); `off`: conditioning scale 0, the
    base UNet alone. `gap = (shuffled - right) / off` is 0 for a model that ignores the conditioning
    (exactly 0 right after creation) and grows as the right conditioning explains the image better.
    """
    rows = batch["pixel_values"].shape[0]
    if rows < 2:
        raise ValueError("control_use_score needs a batch of at least two examples")
    randomness = BatchRandomness(seed, 0, rows, slice(0, rows))
    batch = {**batch, "pixel_values": batch["pixel_values"].to(method.base.vae.device)}
    modes = {name: module.training for name, module in modules.items()}
    for module in modules.values():
        module.eval()

    def loss(**changes) -> float:
        return method.loss(modules, {**batch, **changes}, randomness)["loss"].item()

    try:
        conditioning = batch["conditioning_pixel_values"]
        right, shuffled, off = loss(), loss(conditioning_pixel_values=conditioning.roll(1, dims=0)), loss(conditioning_scale=0.0)
    finally:
        for name, module in modules.items():
            module.train(modes[name])
    return {"right": right, "shuffled": shuffled, "off": off, "gap": (shuffled - right) / off}
