"""Aspect-ratio bucketing: train each image near its own shape instead of a centre square.

Buckets are (width, height) pairs whose sides are multiples of `data.bucketing.step`, between
`min_side` and `max_side`, with at most resolution^2 pixels (the memory a square batch takes): for
512 and step 64, 512x512, 448x576, 384x640, 320x768 ... and their transposes. Each image goes to the
bucket closest to its aspect ratio, is resized to cover it and cropped (centre or random, as
`data.crop` says), so little of the image is lost and nothing is stretched.

Batches hold one bucket at a time (a batch is one tensor). Each epoch every image is used exactly
once: a bucket's images are dealt into global batches, the last one of a bucket may be smaller, and
the batches of all buckets are shuffled together. With several processes a global batch is split
as evenly as possible; a bucket's last batch with fewer images than processes borrows images of the
same bucket so every process has one (`PaddedBatch`); the borrowed ones weigh nothing in the step
(`finetune.training.step_losses.micro_batch_shares`), so N processes train what one process does.
A run resumed with another global batch deals the epoch's images not trained yet at the new one, so
each still trains once that epoch (`finetune.data.order`).
"""

from __future__ import annotations

import math
from collections import Counter

from finetune.config import DataConfig, Recipe
from finetune.counts import counted
from finetune.data.order import Deal, DealtOrder, PaddedBatch, epoch_generator, order_fingerprint
from finetune.errors import FinetuneError

Size = tuple[int, int]  # (width, height), PIL's order


def side_limits(config: DataConfig) -> tuple[int, int]:
    """(shortest, longest) side a bucket may have: data.bucketing's min_side and max_side, else half the resolution
    (rounded down to the step, one step at least) and twice it."""
    settings, step = config.bucketing, config.bucketing.step
    min_side = settings.min_side if settings.min_side is not None else max(step, config.resolution // 2 // step * step)
    max_side = settings.max_side if settings.max_side is not None else config.resolution * 2
    return min_side, max_side


def make_buckets(config: DataConfig) -> list[Size]:
    """Every bucket for the config, sorted from the widest to the tallest (the scheme of kohya's sd-scripts)."""
    step, area = config.bucketing.step, config.resolution * config.resolution
    min_side, max_side = side_limits(config)
    buckets = {(config.resolution, config.resolution)}
    # No side past area // min_side has a bucket (its other side would be below min_side): a max_side of 10**12
    # (a typo) looped over 10**10 widths at the recipe's load, hours without a word, for the same buckets.
    for width in range(min_side, min(max_side, area // min_side) + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets, key=widest_first)


def widest_first(size: Size) -> tuple[float, Size]:
    """The sort key that orders buckets from the widest to the tallest (sizes of one aspect ratio by their size)."""
    return -size[0] / size[1], size


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (in log scale: 2:1 and 1:2 are as far from 1:1)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: (abs(math.log(bucket[0] / bucket[1]) - aspect), -bucket[0] * bucket[1]))


def assign_buckets(sizes: list[Size], config: DataConfig) -> list[Size] | None:
    """Each image's bucket, or None when bucketing is off (every image is a resolution square)."""
    if not config.bucketing.enabled:
        return None
    buckets = make_buckets(config)
    # Once per distinct size: a run assigns its images several times (the check, the dataset, the sampler's layout), and
    # photos of one camera, or a folder cropped to a few shapes, share a handful of sizes among thousands of images.
    by_size = {size: own_size_bucket(size, config) or nearest_bucket(size, buckets) for size in set(sizes)}
    return [by_size[size] for size in sizes]


def own_size_bucket(size: Size, config: DataConfig) -> Size | None:
    """With data.bucketing.no_upscale, as sd-scripts' bucket_no_upscale: a bucket of the image's own shape,
    at its own size or shrunk to resolution^2 pixels if it is larger, sides rounded down to the step, so it
    is cropped a little and never enlarged. None without the setting, or for an image with a side too short
    for one step once shrunk (it takes the nearest regular bucket)."""
    step, (width, height) = config.bucketing.step, size
    if not config.bucketing.no_upscale:
        return None
    if width * height > config.resolution**2:  # shrunk to resolution^2 pixels, rounded as sd-scripts rounds
        width, height = shrunk_size(size, config.resolution**2, step)
    bucket = (width - width % step, height - height % step)
    return bucket if min(bucket) >= step else None


def no_upscale_advice(size: Size, config: DataConfig) -> str:
    """Why data.bucketing.no_upscale enlarged an image (a side shorter than the step once shrunk) and the ways out
    there are: a lower step where the side holds one of 8, the smallest step; else only a larger image."""
    step, (width, height) = config.bucketing.step, size
    if width * height > config.resolution**2:
        width, height = shrunk_size(size, config.resolution**2, step)
    side = min(width, height)
    if side >= 8:
        return f"data.bucketing.no_upscale keeps no side shorter than the step, {step}: lower it to {side - side % 8} or less to keep this image's size"
    return "data.bucketing.no_upscale keeps no side shorter than 8 pixels, the smallest step: use a larger copy of this image, or leave it out"


def shrunk_size(size: Size, area: int, step: int) -> Size:
    """An image's size shrunk to `area` pixels, one side a multiple of `step` and the other following the
    aspect ratio: whichever choice keeps the ratio closer (sd-scripts' BucketManager.select_bucket)."""
    aspect = size[0] / size[1]
    to_step = lambda x: int(x + 0.5) - int(x + 0.5) % step
    width, height = math.sqrt(area * aspect), area / math.sqrt(area * aspect)
    by_width, by_height = to_step(width), to_step(height)
    width_error = abs(by_width / max(to_step(by_width / aspect), 1) - aspect)
    height_error = abs(to_step(by_height * aspect) / max(by_height, 1) - aspect)
    return (by_width, int(by_width / aspect + 0.5)) if width_error < height_error else (int(by_height * aspect + 0.5), by_height)


def bucket_counts_line(bucket_of: list[Size]) -> str:
    """How many images each bucket holds, from the widest bucket to the tallest: the data check's line."""
    counts = Counter(bucket_of)
    order = sorted(counts, key=widest_first)
    return "buckets (width x height: images): " + ", ".join(f"{w}x{h}: {counts[(w, h)]}" for w, h in order)


def split_rows(count: int, num_processes: int, process_index: int) -> slice:
    """Process r's rows of a global batch of `count`: contiguous, sizes differing by at most one."""
    base, extra = divmod(count, num_processes)
    start = process_index * base + min(process_index, extra)
    return slice(start, start + base + (1 if process_index < extra else 0))


# Here, not in batches.py, which imports torch: check-data says them too, without torch.
def ways_to_fill_a_batch(images: int, batch_size: int, processes: int, bucketing: bool = False) -> list[str]:
    """What fills one global batch with `images` images: only the ways that would (lowering a batch size of 1, or
    launching fewer processes than 1, is no way out). With bucketing each process needs one image, whatever the batch size."""
    per_process = 1 if bucketing else batch_size
    smaller_batch = not bucketing and batch_size > 1 and images >= processes
    fewer_processes = processes > 1 and images >= per_process
    ways = []
    if smaller_batch:
        ways.append(f"lower train.batch_size to {images // processes}")
    if fewer_processes:
        most = images // per_process
        ways.append("launch one process" if most == 1 else f"launch at most {most} processes")
    if not (smaller_batch or fewer_processes) and batch_size > 1 and processes > 1 and not bucketing:
        ways.append("lower train.batch_size and launch fewer processes")
    return [*ways, "add images"]


def either(ways: list[str]) -> str:
    """'a, b, or c': the comma keeps a way that has an 'and' in it whole."""
    return ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])}, or {ways[-1]}"


class BucketBatchSampler(DealtOrder):
    """Like `EpochBatchSampler` (deterministic global batches, resumable at any micro-batch, the same
    data on one process or many) with every batch drawn from one bucket; see the module docstring."""

    def __init__(self, bucket_of: list[Size], batch_size: int, num_processes: int, process_index: int, seed: int, start: int = 0,
                 resumed_at: dict | None = None):  # fmt: skip
        if len(bucket_of) < num_processes:  # each process needs a row of every batch, one image at least
            raise FinetuneError(f"the dataset has {counted(len(bucket_of), 'image')}, fewer than the {counted(num_processes, 'process', 'processes')}: "
                                f"{either(ways_to_fill_a_batch(len(bucket_of), batch_size, num_processes, bucketing=True))}")
        self.bucket_of = bucket_of
        self.num_items = len(bucket_of)
        self.global_batch = batch_size * num_processes
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.batches_per_epoch = sum(math.ceil(count / self.global_batch) for count in Counter(bucket_of).values())
        self.images_per_epoch = len(bucket_of)  # every image: a bucket's last batch may be smaller
        self.start_at(start, resumed_at)

    def deal(self, epoch: int, trained: frozenset[int], global_batch: int, processes: int) -> Deal:
        """The epoch's images but `trained`, each bucket's dealt in the epoch's shuffled order into global batches
        (its last one may be smaller), the batches of all buckets shuffled together."""
        import torch  # here: finetune.data.sources reads Size from this module, and `finetune train` checks paths before torch loads

        generator = epoch_generator(self.seed, epoch)
        members: dict[Size, list[int]] = {}
        for index in torch.randperm(len(self.bucket_of), generator=generator).tolist():
            if index not in trained:
                members.setdefault(self.bucket_of[index], []).append(index)
        batches = []
        for bucket in sorted(members):
            items = members[bucket]
            for first in range(0, len(items), global_batch):
                batch = items[first : first + global_batch]
                borrowed = [items[i % len(items)] for i in range(processes - len(batch))]  # a row for each process: one each
                batches.append(PaddedBatch(batch + borrowed, own=len(batch)) if borrowed else batch)
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def rows_of(self, micro_batch: int) -> tuple[int, slice]:
        """(size of global batch `micro_batch`, this process's rows of it)."""
        count = len(self.global_batch_indices(micro_batch))
        return count, split_rows(count, self.num_processes, self.process_index)

    def order_key(self) -> str:
        return order_fingerprint(self.seed, len(self.bucket_of), self.bucket_of)


def too_few_to_batch(trained: int, recipe: Recipe, processes: int = 1, items: int | None = None) -> str | None:
    """Why `trained` items (repeats counted; of `items` before validation.loss_images held some out)
    cannot train, as they do not fill one global batch; or None."""
    batch = recipe.train.batch_size
    needed = processes if recipe.data.bucketing.enabled else batch * processes  # a bucket's last batch may be smaller
    if trained >= needed:
        return None
    held_out = items not in (None, trained)
    if held_out and trained == 0:
        return f"validation.loss_images ({recipe.validation.loss_images}) holds out every image, leaving none to train: lower it below the number of images"
    held = f" ({items} before validation.loss_images held some out)" if held_out else ""
    if recipe.data.bucketing.enabled:  # a bucket's batch may be smaller than train.batch_size, not emptier than one image a process
        short_of = f"{counted(processes, 'process', 'processes')} (with data.bucketing each process needs one image, whatever train.batch_size)"
    else:
        short_of = f"one batch (train.batch_size {batch}" + (f" x {processes} processes)" if processes > 1 else ")")
    ways = ways_to_fill_a_batch(trained, batch, processes, recipe.data.bucketing.enabled)
    remedy = either((["lower validation.loss_images"] if held_out and items >= needed else []) + ways)
    return f"{counted(trained, 'training image')} (repeats counted){held} {'is' if trained == 1 else 'are'} fewer than {short_of}: {remedy}"
