"""DreamBooth's training set: each instance image with its prompt, paired with a class image of its concept, and their
collate function. Apart from `finetune.methods.dreambooth` (diffusers, peft, the class images' sampling) as
`finetune.data.items` and `finetune.controlnet.data` are: data-loader workers import the module of the dataset they are
given, and spawned ones (macOS, Windows) import it afresh, without the model stack (seconds each) or the library
warnings the command line silences in its own process only."""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch.utils.data import Dataset

from finetune.captions.captions import scored_caption, training_caption
from finetune.config import Recipe
from finetune.data.buckets import assign_buckets
from finetune.data.cache import EncodingCache
from finetune.data.images import upright_size
from finetune.data.items import collate_images, item_rng, likely_new_view, mask_entry, render_mask, render_pixels, view_entry
from finetune.data.sources import Example
from finetune.data.views import plan_view


class DreamBoothDataset(Dataset):
    """Item i: instance image i with its prompt, paired with a class image of the same concept.

    A concept's class images are dealt out to its instances in turn, continuing each epoch, so over
    the run every class image is used. With bucketing the class image is cropped to its instance's
    bucket, so both stack into one batch.
    """

    def __init__(
        self, instances: list[tuple[int, Example]], class_examples: list[list[Example]], recipe: Recipe, latent_cache: EncodingCache | None = None,
        held_out: frozenset[int] = frozenset(),
    ):  # fmt: skip
        self.instances = instances
        self.class_examples = class_examples
        self.held_out = held_out  # items validation.loss_images scores: with their prompts as written
        self.config = recipe.data
        self.seed = recipe.seed
        sizes = [upright_size(example) for _, example in instances] if self.config.bucketing.enabled else []
        self.bucket_of = assign_buckets(sizes, self.config)
        self.latent_cache = latent_cache  # items name their cached latents (see data.view_entry)
        self.position: list[int] = []  # instance i is the position[i]-th of its concept
        self.per_concept: Counter[int] = Counter()
        for index, (concept, _) in enumerate(instances):
            if index in held_out:  # validation.loss_images: scored, not trained; dealt only the first class image
                self.position.append(0)
                continue
            self.position.append(self.per_concept[concept])
            self.per_concept[concept] += 1

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        concept, example = self.instances[index]
        rng = item_rng(self.seed, epoch, index)
        config = self.config
        target = self.bucket_of[index] if self.bucket_of else (config.resolution, config.resolution)
        caption = training_caption(example.caption, config, self.seed, epoch, index)
        plan = plan_view(upright_size(example), target, config.crop, config.random_flip, rng)
        if config.caption_dropout > 0 and rng.random() < config.caption_dropout:  # instances only: class images keep the prior's prompt
            caption = ""
        if index in self.held_out:  # after the draw: the class image's view is as before
            caption = scored_caption(example.caption, config, self.seed, index)
        likely_new = likely_new_view(config, epoch)
        item = {"caption": caption, "index": index, **view_entry(example, plan, ("instance", index), self.latent_cache, likely_new)}
        if config.loss_mask.enabled:  # class images have none: their rows weigh every pixel
            item.update(mask_entry(example, plan, self.latent_cache, likely_new))
        if self.class_examples:
            pool, dealt = self.class_examples[concept], self.per_concept[concept]
            class_index = (self.position[index] + epoch * dealt) % len(pool)
            class_plan = plan_view(upright_size(pool[class_index]), target, config.crop, config.random_flip, rng)
            # The whole pool is dealt out once every ceil(len(pool) / dealt) epochs.
            class_likely_new = likely_new_view(config, epoch, epochs_per_visit=math.ceil(len(pool) / max(dealt, 1)))  # 0: all held out
            class_example_id = ("class", concept, class_index)  # `example_of` finds the class image again by it
            item.update(view_entry(pool[class_index], class_plan, class_example_id, self.latent_cache, class_likely_new, prefix="class_"))
            item["class_caption"] = pool[class_index].caption
            if config.loss_mask.enabled:
                item.update(mask_entry(pool[class_index], class_plan, self.latent_cache, class_likely_new, prefix="class_"))
        return item

    def example_of(self, example_id: tuple) -> Example:
        kind, *where = example_id
        return self.instances[where[0]][1] if kind == "instance" else self.class_examples[where[0]][where[1]]

    def render(self, view: tuple) -> torch.Tensor:
        return render_pixels(self.example_of(view[0]), view[1])

    def render_mask(self, view: tuple) -> torch.Tensor:
        return render_mask(self.example_of(view[0]), view[1], as_checked=True)  # a cached view's (see data.mask_entry)


def dreambooth_collate(items: list[dict]) -> dict:
    """Instances first, then their class images: the loss splits the batch at `num_instance`."""
    with_class = "class_caption" in items[0]
    captions = [item["caption"] for item in items] + ([item["class_caption"] for item in items] if with_class else [])
    return {
        **collate_images(items, ("", "class_") if with_class else ("",)),
        "captions": captions,
        "num_instance": len(items),
        "indices": torch.tensor([item["index"] for item in items]),
    }
