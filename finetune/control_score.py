"""`control_use_score`: how much a ControlNet uses its conditioning, measured on training losses."""

from __future__ import annotations

import torch

from finetune.diffusion import BatchRandomness
from finetune.methods.controlnet import ControlNetMethod


@torch.no_grad()
def control_use_score(method: ControlNetMethod, modules: dict, batch: dict, seed: int = 0) -> dict[str, float]:
    """How much the model uses its conditioning, from three losses with the same noise and timesteps.

    `right`: the batch's own conditioning images; `shuffled`: each row gets the row before's, the first the last's (a
    fixed derangement; each row's conditioning must differ from the row before's, else that row scores its own);
    `off`: conditioning scale 0, the base UNet alone. `gap = (shuffled - right) / off` is 0 for a model that ignores the conditioning
    (exactly 0 right after creation) and grows as the right conditioning explains the image better.
    """
    rows = batch["pixel_values"].shape[0]
    if rows < 2:
        raise ValueError("control_use_score needs a batch of at least two examples")
    conditioning = batch["conditioning_pixel_values"]
    own = (conditioning == conditioning.roll(1, dims=0)).flatten(1).all(1)
    if own.any():  # a row "shuffled" onto its own conditioning adds 0 to the gap: a batch of one mask scored 0 for any ControlNet
        raise ValueError(f"control_use_score needs each row's conditioning to differ from the next row's; {int(own.sum())} of {rows} rows have the same")
    randomness = BatchRandomness(seed, 0, rows, slice(0, rows))
    batch = {**batch, "pixel_values": batch["pixel_values"].to(method.base.vae.device)}
    modes = {name: module.training for name, module in modules.items()}
    for module in modules.values():
        module.eval()

    def loss(**changes) -> float:
        return method.loss(modules, {**batch, **changes}, randomness)["loss"].item()

    try:
        right, shuffled, off = loss(), loss(conditioning_pixel_values=conditioning.roll(1, dims=0)), loss(conditioning_scale=0.0)
    finally:
        for name, module in modules.items():
            module.train(modes[name])
    return {"right": right, "shuffled": shuffled, "off": off, "gap": (shuffled - right) / off}
