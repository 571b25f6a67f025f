"""`control_use_score`: how much a ControlNet uses its conditioning, measured on training losses."""

from __future__ import annotations

import torch

from finetune.diffusion import BatchRandomness
from finetune.methods.controlnet import ControlNetMethod


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
