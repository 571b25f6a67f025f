"""ControlNet training data: the dataset that serves the (image, conditioning image, caption) triples
(finetune/controlnet/pairs.py reads and checks them).

One crop and one flip are drawn per item from the (seed, epoch, index) generator and applied to both images; then a
share of captions (`controlnet.empty_prompt_share`) is emptied. Conditioning images come out in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from finetune.captions.captions import scored_caption, training_caption
from finetune.config import DataConfig
from finetune.controlnet.pairs import Pair
from finetune.data.buckets import assign_buckets
from finetune.data.cache import EncodingCache
from finetune.data.files_as_checked import decoded_at_checked_size
from finetune.data.images import upright_size
from finetune.data.items import collate_images, item_rng, likely_new_view, render_pixels, view_entry
from finetune.data.views import ViewPlan, plan_view, render


def conditioning_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1], the range diffusers' ControlNet pipelines feed the ControlNet."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ControlNetDataset(Dataset):
    """Item (index, epoch): the pair's views, drawn from the (seed, epoch, index) generator.

    With bucketing, `bucket_of[i]` is pair i's (width, height) and `make_batch_sampler` batches by it.
    """

    def __init__(self, pairs: list[Pair], config: DataConfig, seed: int, empty_prompt_share: float, latent_cache: EncodingCache | None = None,
                 held_out: frozenset[int] = frozenset()):  # fmt: skip
        self.pairs, self.config, self.seed, self.empty_prompt_share = pairs, config, seed, empty_prompt_share
        self.held_out = held_out  # pairs validation.loss_images scores: with their captions as written
        sizes = [upright_size(pair.image) for pair in pairs]
        self.bucket_of = assign_buckets(sizes, config) if config.bucketing.enabled else None
        self.latent_cache = latent_cache  # the image's latents may be cached; the conditioning is decoded at every use

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        pair = self.pairs[index]
        rng = item_rng(self.seed, epoch, index)
        config = self.config
        target = self.bucket_of[index] if self.bucket_of else (config.resolution, config.resolution)
        plan = plan_view(upright_size(pair.image), target, config.crop, config.random_flip, rng)
        # An edit trains, unless it would be stretched to the plan.
        conditioning = render(decoded_at_checked_size(pair.conditioning, 2 * max(target), "conditioning image", colour_managed=False), plan)
        caption = training_caption(pair.image.caption, config, self.seed, epoch, index)
        if self.empty_prompt_share > 0 and rng.random() < self.empty_prompt_share:
            caption = ""
        if index in self.held_out:
            caption = scored_caption(pair.image.caption, config, self.seed, index)
        item = {"conditioning_pixel_values": conditioning_tensor(conditioning), "caption": caption, "index": index}
        return {**item, **view_entry(pair.image, plan, index, self.latent_cache, likely_new_view(config, epoch))}

    def render(self, view: tuple[int, ViewPlan]) -> torch.Tensor:
        index, plan = view
        return render_pixels(self.pairs[index].image, plan)


def controlnet_collate(items: list[dict]) -> dict:
    return {
        **collate_images(items),
        "conditioning_pixel_values": torch.stack([item["conditioning_pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "indices": torch.tensor([item["index"] for item in items]),
    }
