"""The validation loss: images held out of training (`validation.loss_images`), scored at each validation.

The training loss is a different batch at a different noise level every step, so it is too noisy to
show overfitting. Held-out images scored with the same noise and timesteps every time give a curve
that compares across steps: it falls while the model learns what carries over to images it never
trains on, and turns up once it memorises its own. Every method's loss is used as it is (DreamBooth's
with its class image, ControlNet's with its conditioning), one image at a time (any bucket).
"""

from __future__ import annotations

import os

# Micro-batch numbers no training run reaches: the validation draws are never a training step's.
FIRST_DRAW = 2**40
# Noise and timestep draws per image: four times the forwards for a steadier number.
DRAWS_PER_IMAGE = 4


def split_held_out(sources: list[str], count: int, seed: int) -> tuple[list[int], list[int]]:
    """(items to train on, items to score): `count` distinct images, chosen by `seed` among the sorted
    image paths (the same on every process, in a resume and in check-data), leave training with every
    copy of them (data.folders repeats, a folder under two templates); one copy of each is scored.
    `sources` names the image of each dataset item."""
    if count == 0:
        return list(range(len(sources))), []
    files = [os.path.realpath(source) if os.path.isfile(source) else source for source in sources]  # one file, however written
    images = sorted(set(files))
    import torch  # here: check-data reports the split without loading torch when nothing is held out

    generator = torch.Generator().manual_seed(seed)
    held = {images[i] for i in torch.randperm(len(images), generator=generator)[:count].tolist()}
    first_copy: dict[str, int] = {}
    for index, file in enumerate(files):
        if file in held:
            first_copy.setdefault(file, index)
    return [index for index, file in enumerate(files) if file not in held], sorted(first_copy.values())


def held_out_sources(sources: list[str], trained: list[int]) -> frozenset[str]:
    """The image names (as items give them) that `split_held_out` keeps out of training: `trained` is its first list."""
    return frozenset(sources) - {sources[i] for i in trained}


class TrainingSubset:
    """A method's training dataset without the held-out items; items keep their own index (their
    augmentation and caption draws are those of the whole dataset)."""

    def __init__(self, dataset, kept: list[int]):
        self.dataset = dataset
        self.kept = kept
        buckets = getattr(dataset, "bucket_of", None)
        self.bucket_of = None if buckets is None else [buckets[i] for i in self.kept]

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        return self.dataset[(self.kept[index], epoch)]


def held_out_loss(method, modules: dict, dataset, collate_fn, held_out: list[int], seed: int, device, autocast) -> dict[str, float]:
    """The mean of each loss term over the held-out items, each scored with DRAWS_PER_IMAGE fixed draws.

    Every process computes it whole (under ZeRO-3 each forward needs all of them) and gets the same
    numbers. Trained modules are in eval mode meanwhile (no LoRA dropout)."""
    import torch

    from finetune.diffusion import BatchRandomness  # diffusers: loaded to score, not for check-data

    modes = {name: module.training for name, module in modules.items()}
    for module in modules.values():
        module.eval()
    totals: dict[str, float] = {}
    # Scoring must not disturb the training RNG: a resumed run then follows the same curve.
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        try:
            for n, index in enumerate(held_out):
                batch = collate_fn([dataset[(index, 0)]])
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(device)
                for draw in range(DRAWS_PER_IMAGE):
                    randomness = BatchRandomness(seed, FIRST_DRAW + n * DRAWS_PER_IMAGE + draw, 1, slice(0, 1))
                    with autocast():
                        terms = method.loss(modules, batch, randomness)
                    for name, value in terms.items():
                        totals[name] = totals.get(name, 0.0) + value.detach().float().item()
        finally:
            for name, module in modules.items():
                module.train(modes[name])
    return {name: total / (len(held_out) * DRAWS_PER_IMAGE) for name, total in totals.items()}
