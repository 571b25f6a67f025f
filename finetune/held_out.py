"""The validation loss: images held out of training (`validation.loss_images`), scored at each validation.

The training loss is a different batch at a different noise level every step, so it is too noisy to
show overfitting. Held-out images scored with the same noise and timesteps every time give a curve
that compares across steps: it falls while the model learns what carries over to images it never
trains on, and turns up once it memorises its own. Every method's loss is used as it is (DreamBooth's
with its class image, ControlNet's with its conditioning), one image at a time (any bucket).
"""

from __future__ import annotations

import torch

from finetune.diffusion import BatchRandomness

# Micro-batch numbers no training run reaches: the validation draws are never a training step's.
FIRST_DRAW = 2**40
# Noise and timestep draws per image: four times the forwards for a steadier number.
DRAWS_PER_IMAGE = 4


def held_out_indices(num_items: int, count: int, seed: int) -> list[int]:
    """`count` of the dataset's items, chosen by `seed`: the same on every process and in a resumed run."""
    if count == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_items, generator=generator)[:count].tolist())


class TrainingSubset:
    """A method's training dataset without the held-out items; items keep their own index (their
    augmentation and caption draws are those of the whole dataset)."""

    def __init__(self, dataset, held_out: list[int]):
        excluded = set(held_out)
        self.dataset = dataset
        self.kept = [i for i in range(len(dataset)) if i not in excluded]
        buckets = getattr(dataset, "bucket_of", None)
        self.bucket_of = None if buckets is None else [buckets[i] for i in self.kept]

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        return self.dataset[(self.kept[index], epoch)]


@torch.no_grad()
def held_out_loss(method, modules: dict, dataset, collate_fn, held_out: list[int], seed: int, device, autocast) -> dict[str, float]:
    """The mean of each loss term over the held-out items, each scored with DRAWS_PER_IMAGE fixed draws.

    Every process computes it whole (under ZeRO-3 each forward needs all of them) and gets the same
    numbers. Trained modules are in eval mode meanwhile (no LoRA dropout)."""
    modes = {name: module.training for name, module in modules.items()}
    for module in modules.values():
        module.eval()
    totals: dict[str, float] = {}
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
