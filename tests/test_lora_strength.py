"""--lora-scale: the LoRA's strength reaches the model `sample` (and eval) draws with. Nothing checked it: the
option's refusals were tested, its effect was not, so a strength ignored (always 1) passed the suite."""

import numpy as np
import torch
from PIL import Image

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.cli.main import main
from finetune.sampling.inference import load_sampling_pipeline
from finetune.training.trainer import train


def unet_output(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, pipeline.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipeline.unet(latents, torch.tensor([10, 700]), text).sample


def test_the_lora_scale_is_the_strength_the_pipeline_applies(make_recipe, tiny_model, tmp_path):
    lora = str(train(make_recipe(train__max_steps=2, optimizer__lr=1e-2)).output_dir / LORA_WEIGHTS_NAME)
    base = unet_output(load_sampling_pipeline(str(tiny_model)))
    outputs = {scale: unet_output(load_sampling_pipeline(str(tiny_model), lora, scale)) for scale in (0.0, 0.5, 1.0)}
    assert torch.allclose(outputs[0.0], base, atol=1e-6)  # strength 0: the base model
    full, half = outputs[1.0] - base, outputs[0.5] - base
    assert full.abs().max() > 1e-3  # the LoRA does something at strength 1
    # Each layer's update is scaled by the strength: for a small update the output moves in proportion to it.
    assert torch.allclose(half, 0.5 * full, atol=0.05 * full.abs().max().item())

    # Through `finetune sample`: --lora-scale 0 draws the base model's image, the default strength another.
    def sampled(name, *options):
        argv = ["sample", "--base", str(tiny_model), "--prompt", "a red circle", "--num-images", "1", "--steps", "2", "--out", str(tmp_path / name)]
        assert main([*argv, *options]) == 0
        return np.asarray(Image.open(tmp_path / name / "00000-prompt0_seed0.png"))

    plain = sampled("base")
    assert np.array_equal(sampled("off", "--lora", lora, "--lora-scale", "0"), plain)
    assert not np.array_equal(sampled("on", "--lora", lora), plain)
