"""Found by walking through the demo as a user: train, start the demo on those adapters, compare with `finetune sample`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from finetune.demo_engine import DemoEngine, Request
from finetune.inference import sample_to_folder

PROMPT = "a large red striped circle on a blue background, center"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_weak_lora_in_bf16_renders_as_finetune_sample_renders_it(tiny_model, adapters_dir, tmp_path):
    """The demo merged LoRAs into the weights: in bf16 a weak LoRA's update is below half a weight's last bit and was
    rounded away (strength 0.1 gave the base's image, bit for bit), while `finetune sample` (peft's layers) shows it."""
    engine = DemoEngine(str(tiny_model), adapters_dir, device="cpu", precision="bf16")
    weights = {name: tensor.clone() for name, tensor in engine.base.unet.state_dict().items()}
    request = Request(prompt=PROMPT, seed=4, steps=3, guidance=5.0, size=64, loras=[("trained", 1.0)], strengths=[0.0, 0.1])
    images, labels, _, _ = engine.render(request)
    base, at_zero, weak = (pixels(image) for image in images[0])
    assert labels == ["base", "trained x0", "trained x0.1"]
    sample_to_folder(str(tiny_model), str(adapters_dir / "trained"), 0.1, [PROMPT], None, 1, 4, 3, 5.0, 64, tmp_path,
                     device="cpu", precision="bf16")  # fmt: skip
    sampled = pixels(Image.open(tmp_path / "prompt0_seed4.png"))
    assert np.array_equal(at_zero, base)
    assert not np.array_equal(weak, base)
    assert np.abs(weak - sampled).max() <= 1, np.abs(weak - sampled).max()  # merged in bf16: 6 levels off
    assert all(torch.equal(tensor, weights[name]) for name, tensor in engine.base.unet.state_dict().items())
