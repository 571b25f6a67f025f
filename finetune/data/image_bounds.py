"""The largest images finetune makes: a side (data.resolution, sample's --resolution) and a grid (validation grids,
sample's and eval's grids); the most class images it makes (dreambooth.num_class_images, bench's --num-images), and
makes in one call (dreambooth.class_generation.batch_size). Kept apart from finetune.config, which imports pydantic, so
that the command line checks its options against the same bounds before anything heavy loads."""

from __future__ import annotations

# The largest data.resolution. SD1.5 was trained at 512, SD2 at 768 and SDXL at 1024, and sd-scripts users train up to
# about 2048; 4096 is 16 times SDXL's pixels. The cost grows with the pixels: one image's VAE encode alone held some
# 2.5 KB per pixel (measured: SD1.5's VAE, fp32, no gradients, 0.66 GB at 512), 42 GB at 4096 before the UNet trains.
# data.resolution: 1000000 (a typo) resized each image to 3 TB once the model had loaded, until memory ran out;
# a 0 too many on 512 or 1024 (5120, 10240) is past the bound.
MAX_RESOLUTION = 4096
RESOLUTION_BOUND = (f"must be at most {MAX_RESOLUTION} (SD1.5 trains at 512, SDXL at 1024; one image's VAE pass alone holds some 2.5 KB "
                    "per pixel): lower it")  # fmt: skip

# Generated class image k is named <key>-<k:05d>.png, and only names of 5 digits are read back as generated
# (finetune/dreambooth/class_images.py): image 100,000 on would be taken for a user's own, and then by a concept of another class
# prompt sharing the folder. Planning 10**9 (a typo) listed and looked for every name first: 12 s and 0.8 GB a million, before the model loaded.
MAX_CLASS_IMAGES = 100_000

# The most pixels one call makes class images of (dreambooth.class_generation.batch_size images at data.resolution): those of
# its default batch, 4, at MAX_RESOLUTION (so the default fits every resolution); 256 images of 512 px, 64 of 1024. batch_size:
# 1000000 (a typo) had one call hold every missing image: halved where it runs out of GPU memory (finetune/dreambooth/class_images.py), never
# on a CPU, where each image's VAE pass alone holds some 2.5 KB per pixel.
CLASS_BATCH_DEFAULT = 4
MAX_CLASS_BATCH_PIXELS = CLASS_BATCH_DEFAULT * MAX_RESOLUTION * MAX_RESOLUTION

GRID_LABEL_WIDTH = 160  # the left margin of labelled grids (sample grids, validation grids, eval grids)
# The largest image finetune opens: PIL refuses past twice its MAX_IMAGE_PIXELS, which finetune/data/images.py raises to its
# TRUSTED_IMAGE_PIXELS (300M; PIL's own default refuses past 179M): its MAX_READ_PIXELS. Not read from there: importing it
# sets PIL's bound. validation.images_per_prompt: 1000000 sampled for days, holding every image in
# memory (3 TB at 1024 px) before drawing a grid that could not be opened, without a word.
MAX_GRID_PIXELS = 600_000_000


def grid_problem(grid: str, count_name: str, count: int, rows: int, resolution: int, extra_columns: int, fix: str) -> str | None:
    """Why a labelled grid of `rows` rows, each of `count` images (`count_name` says which setting gives it) and
    `extra_columns` more (a ControlNet's conditioning image), at `resolution` px would be too large to draw and open
    again, ending with `fix`; or None."""
    width, height = GRID_LABEL_WIDTH + (count + extra_columns) * resolution, rows * resolution
    if width * height <= MAX_GRID_PIXELS:
        return None
    return (f"{count_name} ({count}) with {rows} prompt row{'s' if rows > 1 else ''} at {resolution} px makes a {width}x{height} {grid}, more "
            f"than the {MAX_GRID_PIXELS:,} pixels finetune opens (PIL refuses larger images as decompression bombs): {fix}")  # fmt: skip


def sample_grid_problem(num_images: int, prompts: int, resolution: int, controlnet: bool) -> str | None:
    """`finetune sample`'s grid (a row per --prompt, a ControlNet's starting with its --condition) is drawn as the
    recipe's validation grid is: --num-images 1000000 sampled for days before drawing a grid that could not be opened."""
    fix = "lower --num-images or --resolution" + (", or give fewer --prompt" if prompts > 1 else "")
    return grid_problem("grid", "--num-images", num_images, prompts, resolution, 1 if controlnet else 0, fix)


def class_batch_problem(batch_size: int, resolution: int) -> str | None:
    """Why `batch_size` class images of `resolution` px are too many for one call (MAX_CLASS_BATCH_PIXELS), or None."""
    largest = max(1, MAX_CLASS_BATCH_PIXELS // (resolution * resolution))
    if batch_size <= largest:
        return None
    return (f"dreambooth.class_generation.batch_size ({batch_size}) makes {batch_size} class images of {resolution} px in one call, more pixels "
            f"than its default, {CLASS_BATCH_DEFAULT}, at the largest data.resolution ({MAX_RESOLUTION} px; each image's VAE pass alone holds some "
            f"2.5 KB per pixel): lower it to {largest} or less")  # fmt: skip
