"""Whether a ControlNet uses its conditioning: the control-use score is exactly 0 at creation and moves
with the zero convs, is clearly positive for the shipped toy-world ControlNet, and becomes positive in
a 1,000-step run of recipes/toyworld/controlnet_mask.yaml on the shipped base (marked slow: make test-slow)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from controlnet_helpers import Capture, controlnet_recipe, fixed_batch, set_up, zero_convs
from PIL import Image

from finetune.methods.controlnet import ControlNetMethod
from finetune.toyworld.datasets import write_folder
from finetune.training.diffusion import BatchRandomness
from finetune.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TOYWORLD_BASE = ROOT / "finetune" / "assets" / "toyworld-base"
# recipes/toyworld/controlnet_mask.yaml after 3,000 steps on the shipped base, as fp16 (docs/results.md).
TOYWORLD_CONTROLNET = ROOT / "finetune" / "assets" / "toyworld-controlnet-mask"


@torch.no_grad()
def control_use_score(method: ControlNetMethod, modules: dict, batch: dict) -> dict[str, float]:
    """How much the model uses its conditioning, from three training losses with the same noise and timesteps (docs/results.md).

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
    randomness = BatchRandomness(0, 0, rows, slice(0, rows))
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


def test_control_use_score_is_exactly_zero_at_creation_and_moves_with_training(make_recipe, pairs_folder):
    method = set_up(controlnet_recipe(make_recipe, pairs_folder))
    batch = fixed_batch(method, [0, 1, 2, 3])
    score = control_use_score(method, {"controlnet": method.controlnet}, batch)
    assert score["right"] == score["shuffled"] == score["off"] and score["gap"] == 0.0

    # Validation rows: conditioning | samples; one explicit conditioning image serves both prompts.
    condition = pairs_folder / "conditioning" / "0002.png"
    method.settings.validation_conditions = [str(condition)]
    method.recipe.validation.prompts = ["a red circle", "a blue square"]
    method.recipe.validation.num_inference_steps, method.recipe.validation.images_per_prompt = 1, 1
    rows, labels = method.validation_images({"controlnet": method.controlnet})
    assert labels == ["a red circle", "a blue square"] and [len(row) for row in rows] == [2, 2]
    for row in rows:
        assert np.array_equal(np.asarray(row[0]), np.asarray(Image.open(condition).convert("RGB")))

    with torch.no_grad():  # a perturbed ControlNet: the three losses separate
        for conv in zero_convs(method.controlnet).values():
            conv.normal_(0, 0.05)
    moved = control_use_score(method, {"controlnet": method.controlnet}, batch)
    assert moved["off"] == score["off"] and moved["right"] != moved["off"] and moved["gap"] != 0.0


def test_control_use_score_refuses_rows_shuffled_onto_their_own_conditioning(make_recipe, pairs_folder):
    """Rows whose next row has the same conditioning are scored against their own under 'shuffled': a batch of
    one mask gave a gap of 0 (reads as a ControlNet ignoring its conditioning) whatever the ControlNet."""
    method = set_up(controlnet_recipe(make_recipe, pairs_folder))
    with torch.no_grad():
        for conv in zero_convs(method.controlnet).values():
            conv.normal_(0, 0.05)  # a ControlNet that reads its conditioning
    batch = fixed_batch(method, [0, 1, 2, 3])
    same = {**batch, "conditioning_pixel_values": batch["conditioning_pixel_values"][:1].expand_as(batch["conditioning_pixel_values"]).clone()}
    with pytest.raises(ValueError, match=r"differ from the next row's; 4 of 4 rows have the same$"):
        control_use_score(method, {"controlnet": method.controlnet}, same)
    assert control_use_score(method, {"controlnet": method.controlnet}, batch)["gap"] != 0.0


def test_control_use_score_of_the_shipped_toyworld_controlnet_is_clearly_positive(tmp_path):
    """The same score on the shipped base: 0 for a ControlNet just created from its UNet, clearly positive
    for the one recipes/toyworld/controlnet_mask.yaml trained for 3,000 steps (measured 0.84-0.99 in fp32).
    The next test trains one from scratch."""
    from finetune.config.recipe_loading import recipe_from_dict

    folder = write_folder(tmp_path / "world", 16, seed=21, conditioning=True)

    def method_with(controlnet: dict) -> ControlNetMethod:
        return set_up(recipe_from_dict({
            "method": "controlnet", "seed": 0, "output_dir": str(tmp_path / "run"), "model": {"pretrained": str(TOYWORLD_BASE)},
            "data": {"image_dir": str(folder), "resolution": 64}, "controlnet": controlnet, "validation": {"prompts": []},
        }))  # fmt: skip

    scores = {}
    for name, settings in {"created": {}, "trained": {"pretrained": str(TOYWORLD_CONTROLNET)}}.items():
        method = method_with(settings)
        batch = fixed_batch(method, list(range(16)), empty_prompts=True)  # the conditioning alone must tell
        scores[name] = control_use_score(method, {"controlnet": method.controlnet}, batch)
    assert scores["created"]["gap"] == 0.0 and scores["created"]["off"] == scores["trained"]["off"], scores
    assert scores["trained"]["gap"] > 0.5, scores


@pytest.mark.slow
def test_control_use_is_clearly_positive_after_training_on_the_toyworld_base(tmp_path, monkeypatch):
    """recipes/toyworld/controlnet_mask.yaml for 1,000 steps on the shipped base (about 4 minutes on 2
    cores: `make test-slow`; it is what shows a ControlNet learning to read its mask). The default suite
    checks that the conditioning pixels reach the ControlNet in training (tests/test_controlnet.py).

    On the documented run the control took hold between steps 500 and 1,000 (placement IoU 0.13 ->
    0.51, docs/results.md). Cheaper runs stay at a gap of 0: 1,500 steps of batch 16 on 256 images, or
    800 of batch 32 at lr 5e-4, ended within +-0.001 (the ControlNet lowers the loss without reading the
    mask before the control takes hold).
    """
    from finetune.config.recipe_loading import load_recipe

    folder = write_folder(tmp_path / "world", 10000, seed=3, conditioning=True)
    recipe = load_recipe(ROOT / "recipes" / "toyworld" / "controlnet_mask.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.image_dir={folder}", "train.max_steps=1000", "train.cache_dir=null",
        "validation.prompts=[]", "controlnet.validation_conditions=[]", "checkpoint.every_n_steps=0", "logging.tensorboard=false",
    ])  # fmt: skip
    capture = Capture(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # other test modules pin 1 thread; this run is 2x faster on CI's 2 cores
    try:
        train(recipe)
    finally:
        torch.set_num_threads(threads)
    method = capture.method
    batch = fixed_batch(method, list(range(16)), empty_prompts=True)  # the conditioning alone must tell
    score = control_use_score(method, {"controlnet": method.controlnet}, batch)
    assert score["gap"] > 0.05, score
