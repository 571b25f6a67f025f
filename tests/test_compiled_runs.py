"""Compiled training (`accelerate launch --dynamo_backend inductor`) compiles each trained module once per kind of input,
not again at each shape of batch, validation or checkpoint: past torch's recompile limit (8) a module runs uncompiled
for the rest of the run, and each compile of SD1.5 takes minutes on a GPU.

Compiles are counted with dynamo's own counters. The runs use dynamo's `eager` backend: the guards that decide when a
module compiles again are dynamo's, whichever backend compiles the graph (inductor takes minutes per graph here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from torch._dynamo.utils import counters

from finetune.accelerate_state import clear_accelerate_settings
from finetune.distributed import ready_to_compile
from finetune.trainer import train

# As `accelerate launch --dynamo_backend eager` sets them without --dynamo_use_dynamic.
LAUNCH_ENVIRONMENT = {"ACCELERATE_DYNAMO_BACKEND": "EAGER", "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_DYNAMIC": "False"}


@pytest.fixture
def compiling(monkeypatch):
    """accelerate's compile settings in the environment; dynamo's counters and caches fresh, and cleared after."""
    for key, value in LAUNCH_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def fallbacks(counted) -> int:
    """Frames dynamo gave up on (the recompile limit among them): they ran uncompiled."""
    return counted["frames"]["total"] - counted["frames"]["ok"]


def test_a_module_compiled_as_accelerate_launch_asks_takes_batches_of_many_shapes(compiling):
    """`accelerate launch` asks for static shapes (dynamic=False) unless --dynamo_use_dynamic: without ready_to_compile
    each of these ten shapes compiled again, and the ninth ran uncompiled. Now: static, then the batch and the sides
    dynamic, each with batch 1 apart (dynamo specializes a size of 1)."""
    accelerator = Accelerator(cpu=True)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.SiLU())
        ready_to_compile(accelerator, [model])
        compiled = accelerator.prepare(model)
        for batch, side in [(2, 8), (1, 8), (2, 10), (1, 10), (2, 6), (1, 6), (2, 12), (1, 12), (2, 14), (1, 14)]:
            compiled(torch.randn(batch, 4, side, side + 4)).sum().backward()
    finally:
        clear_accelerate_settings()
    assert compiling["stats"]["unique_graphs"] <= 4 and fallbacks(compiling) == 0


def test_a_new_controlnets_first_save_changes_nothing_its_compiled_forward_reads(tmp_path, compiling):
    """diffusers' first save_pretrained wrote two keys into a fresh ControlNet's config, whose length its compiled forward
    is guarded on: the first checkpoint compiled the ControlNet again."""
    from diffusers import ControlNetModel

    from finetune.tiny_model import build_tiny_pipeline

    controlnet = ControlNetModel.from_unet(build_tiny_pipeline().unet)
    accelerator = Accelerator(cpu=True)
    try:
        ready_to_compile(accelerator, [controlnet])
    finally:
        clear_accelerate_settings()
    before = dict(controlnet.config)
    controlnet.save_pretrained(tmp_path / "controlnet")
    assert dict(controlnet.config) == before


def mixed_folder(folder):
    """Three aspect-ratio buckets at 64 px (80x48, 64x64, 48x80), two or three images each."""
    folder.mkdir()
    sizes = [(96, 48), (100, 50), (98, 49), (48, 96), (50, 100), (64, 64), (66, 66), (65, 65)]
    for i, (width, height) in enumerate(sizes):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red striped circle")
    return folder


@pytest.mark.slow  # ~1.5 minutes: dynamo traces the tiny UNet's forward and backward at each compile
def test_a_compiled_lora_run_with_buckets_validation_and_checkpoints_compiles_the_unet_at_most_three_times(make_recipe, tmp_path, compiling):
    """Buckets and their smaller last batches, the held-out loss (no gradients: another graph), the validation grid and
    checkpoints. Before: a static graph per shape of batch (4 here; 8 and then uncompiled for 7 buckets)."""
    recipe = make_recipe(
        data__image_dir=str(mixed_folder(tmp_path / "mixed")), data__bucketing={"enabled": True, "step": 16}, train__max_steps=10,
        validation__every_n_steps=3, validation__loss_images=1, validation__prompts=["a shape"], validation__num_inference_steps=2,
        checkpoint__every_n_steps=3, train__ema_decay=0.9,
    )  # fmt: skip
    result = train(recipe)
    assert result.final_step == 10 and len(result.validation_losses) == 5
    assert compiling["stats"]["unique_graphs"] <= 3 and fallbacks(compiling) == 0


@pytest.mark.slow  # ~1 minute
def test_a_compiled_controlnet_run_compiles_once_through_validation_and_checkpoints(make_recipe, pairs_folder, compiling):
    """Before: 4 compiles (the held-out loss's no-grad graph, and both again after the first checkpoint's save)."""
    recipe = make_recipe(
        method="controlnet", data__image_dir=str(pairs_folder), train__max_steps=6, checkpoint__every_n_steps=2,
        validation__every_n_steps=2, validation__loss_images=1, validation__prompts=["a shape"], validation__num_inference_steps=2,
    )  # fmt: skip
    result = train(recipe)
    assert result.final_step == 6 and len(result.validation_losses) == 4
    assert (compiling["stats"]["unique_graphs"], fallbacks(compiling)) == (1, 0)


def test_the_bench_compiles_controlnet_on_request_as_accelerate_launch_would():
    from finetune.bench.variants import DEFAULT_VARIANTS, VARIANTS

    variant = VARIANTS["controlnet_compiled"]
    assert variant.environment == {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"} and "controlnet_compiled" not in DEFAULT_VARIANTS
    assert variant.build({"train": {}}, None) == VARIANTS["controlnet"].build({"train": {}}, None)
