"""Training data: a folder of captioned images or a `datasets` dataset, checked before training.

Every image is opened and decoded once up front, so a corrupt, truncated or tiny file stops the run
with its name before any model is loaded. Randomness (crop, flip, caption dropout) is drawn from a
generator seeded by (seed, epoch, index): the same item looks the same in a resumed run and on any
number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune.config import DataConfig
from finetune.errors import FinetuneError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Example:
    """One training image: where to find it (a file or a dataset row) and its caption."""

    source: str  # a file path, or "dataset row N"
    caption: str
    load: Callable[[], Image.Image]


def load_examples(config: DataConfig, check: bool = True) -> list[Example]:
    """The examples of a folder or dataset; with `check`, every image is decoded and its size checked."""
    examples = _folder_examples(config) if config.image_dir else _dataset_examples(config)
    if check:
        check_images(examples, min_size=config.min_image_size or config.resolution // 2)
    return examples


# ---------------------------------------------------------------------------------------------------
# Sources


def _folder_examples(config: DataConfig) -> list[Example]:
    folder = Path(config.image_dir)
    if not folder.is_dir():
        raise FinetuneError(f"data folder {folder} not found: check data.image_dir in the recipe")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FinetuneError(f"data folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}): add some or fix data.image_dir")
    metadata = read_metadata_captions(folder / "metadata.jsonl")
    examples = []
    for path in images:
        if config.caption is not None:
            caption = config.caption
        elif path.name in metadata:
            caption = metadata[path.name]
        elif path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        else:
            raise FinetuneError(
                f"image {path} has no caption: add {path.with_suffix('.txt').name}, a metadata.jsonl entry, "
                "or set data.caption to one prompt for all images"
            )
        examples.append(Example(str(path), caption, lambda p=path: Image.open(p)))
    return examples


def read_metadata_captions(path: Path, require_text: bool = True) -> dict[str, str]:
    """{file name: caption} from a metadata.jsonl; rows without "text" are an error unless not required."""
    if not path.is_file():
        return {}
    captions = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if require_text or "text" in row:
                captions[Path(row["file_name"]).name] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FinetuneError(f"{path} line {line_number}: expected a JSON object with 'file_name' and 'text'") from None
    return captions


def open_dataset(config: DataConfig):
    """The `datasets.Dataset` of `config.dataset` (hub name, local path or save_to_disk folder), split chosen."""
    import datasets

    name = config.dataset
    try:
        if Path(name).is_dir() and ((Path(name) / "dataset_info.json").is_file() or (Path(name) / "state.json").is_file()):
            loaded = datasets.load_from_disk(name)  # a dataset saved with save_to_disk
        else:
            loaded = datasets.load_dataset(name, config.dataset_config, split=config.dataset_split)
    except FileNotFoundError as err:
        raise FinetuneError(f"dataset {name} not found: {str(err).splitlines()[0]}") from None
    except ConnectionError:
        raise FinetuneError(f"dataset {name} is not in the local cache and the hub cannot be reached: use a local path") from None
    if isinstance(loaded, datasets.DatasetDict):
        if config.dataset_split not in loaded:
            raise FinetuneError(f"dataset {name} has no split '{config.dataset_split}' (has {', '.join(loaded)}): set data.dataset_split")
        loaded = loaded[config.dataset_split]
    return loaded


def _dataset_examples(config: DataConfig) -> list[Example]:
    name = config.dataset
    loaded = open_dataset(config)
    columns = loaded.column_names
    needed = [("data.image_column", config.image_column)]
    if config.caption is None:
        needed.append(("data.caption_column", config.caption_column))
    for key, column in needed:
        if column not in columns:
            raise FinetuneError(f"dataset {name} has no column '{column}' ({key}); its columns are: {', '.join(columns)}")
    if len(loaded) == 0:
        raise FinetuneError(f"dataset {name} split '{config.dataset_split}' is empty")
    captions = [config.caption] * len(loaded) if config.caption is not None else loaded[config.caption_column]
    images = loaded.select_columns([config.image_column])
    return [
        Example(f"dataset {name} row {row}", str(captions[row]), lambda row=row: images[row][config.image_column])
        for row in range(len(loaded))
    ]


# ---------------------------------------------------------------------------------------------------
# Checks and transforms


def open_rgb(example: Example) -> Image.Image:
    """Decode fully (so truncation shows), apply EXIF rotation, and convert any mode to RGB."""
    try:
        image = example.load()
        image.load()
    except Exception as err:  # PIL raises many types for broken files
        raise FinetuneError(f"image {example.source} cannot be read ({err.__class__.__name__}: {err}): fix or remove it") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white rather than whatever colour the hidden pixels hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode == "I;16" or image.mode == "I":
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def check_images(examples: list[Example], min_size: int) -> None:
    for example in examples:
        image = open_rgb(example)
        if min(image.size) < min_size:
            raise FinetuneError(
                f"image {example.source} is {image.size[0]}x{image.size[1]}, smaller than {min_size} px on its short side: "
                "remove it, or lower data.min_image_size"
            )


def resize_and_crop(image: Image.Image, resolution: int, crop: str, rng: np.random.Generator) -> Image.Image:
    scale = resolution / min(image.size)
    new_size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(new_size, Image.Resampling.LANCZOS)
    extra_x, extra_y = image.width - resolution, image.height - resolution
    if crop == "random":
        left, top = int(rng.integers(0, extra_x + 1)), int(rng.integers(0, extra_y + 1))
    else:
        left, top = extra_x // 2, extra_y // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def prepare_image(example: Example, config: DataConfig, rng: np.random.Generator) -> torch.Tensor:
    """Decode, resize, crop and maybe flip (as `config` says, drawing from `rng`); CHW in [-1, 1]."""
    image = resize_and_crop(open_rgb(example), config.resolution, config.crop, rng)
    if config.random_flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return to_tensor(image)


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Items are looked up by (index, epoch) so augmentation is reproducible; see `EpochBatchSampler`."""

    def __init__(self, examples: list[Example], config: DataConfig, seed: int):
        self.examples = examples
        self.config = config
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        example = self.examples[index]
        rng = item_rng(self.seed, epoch, index)
        pixel_values = prepare_image(example, self.config, rng)
        caption = example.caption
        if self.config.caption_dropout > 0 and rng.random() < self.config.caption_dropout:
            caption = ""
        return {"pixel_values": pixel_values, "caption": caption, "index": index}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "indices": torch.tensor([item["index"] for item in items]),
    }


class EpochBatchSampler:
    """An endless, deterministic stream of this process's micro-batches, starting at any micro-batch.

    Micro-batch m covers the global batch m of a seeded permutation of the dataset (a new permutation
    each epoch); process r takes its slice [r*B, (r+1)*B). One process with batch N*B therefore sees
    exactly what N processes with batch B see together, and a resumed run starts where it stopped
    without replaying anything.
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, process_index: int, seed: int, start: int = 0):
        self.global_batch = batch_size * num_processes
        if num_items < self.global_batch:
            raise FinetuneError(
                f"the dataset has {num_items} images, fewer than one global batch ({batch_size} x {num_processes} processes): "
                "lower train.batch_size or add images"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.process_index = process_index
        self.seed = seed
        self.start = start
        self.batches_per_epoch = num_items // self.global_batch
        self._cached: tuple[int, list[int]] = (-1, [])

    def permutation(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_items, generator=generator).tolist())
        return self._cached[1]

    def global_batch_indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        first = position * self.global_batch
        return self.permutation(epoch)[first : first + self.global_batch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro_batch = self.start
        while True:
            epoch = micro_batch // self.batches_per_epoch
            indices = self.global_batch_indices(micro_batch)
            mine = indices[self.process_index * self.batch_size : (self.process_index + 1) * self.batch_size]
            yield [(index, epoch) for index in mine]
            micro_batch += 1
