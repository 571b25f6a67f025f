"""train.ema_decay under DeepSpeed with bf16 (ZeRO-2 and ZeRO-3, two processes on CPU): the average is of the
optimizer's fp32 master weights, step by step as the formula says, not of the engine's bf16 copies; validation
samples it and the run saves it; it leaves training as it was, and a resumed run continues it."""

from types import SimpleNamespace

import pytest
import torch
from conftest import build_recipe
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from test_distributed import deepspeed, launch, wait, write

from finetune.ema import EMA_FILE
from finetune.methods.full import PIPELINE_DIR

DECAY = 0.5  # the warm-up's (1 + n) / (10 + n) stays below it for these 4 steps
STEPS = 4


@pytest.fixture(scope="module", params=["zero2.json", "zero3.json"])
def runs(request, tiny_model, image_folder, tmp_path_factory) -> SimpleNamespace:
    """One launch per config: a full fine-tune in bf16 without the average and with it, each recording its fp32
    masters after every step and the weights validation samples with (tests/distributed_worker.py --weights), with
    validation at steps 2 and 4; and the averaged run resumed from its checkpoint-2."""
    root = tmp_path_factory.mktemp(request.param.removesuffix(".json"))
    common = dict(method="full", train__batch_size=1, train__max_steps=STEPS, train__mixed_precision="bf16", optimizer__lr=1e-3,
                  checkpoint__every_n_steps=2, validation__prompts=["a shape"], validation__every_n_steps=2,
                  validation__num_inference_steps=2, validation__images_per_prompt=1)  # fmt: skip
    recipes = {
        "plain": build_recipe(tiny_model, image_folder, root / "plain", **common),
        "averaged": build_recipe(tiny_model, image_folder, root / "averaged", train__ema_decay=DECAY, **common),
        "resumed": build_recipe(tiny_model, image_folder, root / "resumed", train__ema_decay=DECAY, **common),
    }
    paths = {name: write(recipe, root / f"{name}.yaml") for name, recipe in recipes.items()}
    wait(launch(deepspeed(request.param), "--weights", paths["plain"], "--weights", paths["averaged"],
                "--resume", root / "averaged" / "checkpoints" / "checkpoint-2", paths["resumed"]))  # fmt: skip
    return SimpleNamespace(root=root)


def masters(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"masters-{step}.safetensors")


def in_bf16(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.bfloat16() for name, t in weights.items()}


def saved_unet(run) -> dict[str, torch.Tensor]:
    """The run's output UNet, named as the trained parameters are (the module's name, then the parameter's)."""
    return {f"unet.{name}": t for name, t in UNet2DConditionModel.from_pretrained(run / PIPELINE_DIR / "unet").state_dict().items()}


def expected_average(run, updates: int) -> dict[str, torch.Tensor]:
    """The formula over the recorded fp32 masters: avg_0 = the weights the engine starts from (the pretrained ones,
    in bf16), then avg += (1 - d_n) * (master_n+1 - avg), d_n = min(DECAY, (1 + n) / (10 + n))."""
    average = {name: t.float() for name, t in in_bf16(load_file(run / "initial.safetensors")).items()}
    for n in range(updates):
        for name, master in masters(run, n + 1).items():
            average[name].lerp_(master, 1 - min(DECAY, (1 + n) / (10 + n)))
    return average


def assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=0, atol=1e-6), (name, (got[name] - expected[name]).abs().max())


def assert_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in expected)


@pytest.mark.slow  # a DeepSpeed launch per ZeRO stage (three runs, two interpreters): about a minute each
def test_the_average_is_of_the_fp32_masters_in_the_checkpoints_and_the_output(runs):
    run = runs.root / "averaged"
    assert_close(load_file(run / "checkpoints" / "checkpoint-2" / EMA_FILE), expected_average(run, 2))
    assert_close(load_file(run / "checkpoints" / f"checkpoint-{STEPS}" / EMA_FILE), expected_average(run, STEPS))
    assert_close(saved_unet(run), expected_average(run, STEPS))
    # The engine's bf16 copies are measurably other weights than the masters (what this test tells apart).
    last = masters(run, STEPS)
    assert any(not torch.allclose(t.bfloat16().float(), last[name], rtol=0, atol=1e-6) for name, t in last.items())


@pytest.mark.slow
def test_validation_samples_with_the_average_in_the_engines_bf16_weights(runs):
    averaged = runs.root / "averaged"
    for step in (2, STEPS):  # the checkpoint of the same step holds that average
        assert_equal(load_file(averaged / f"sampled-{step}.safetensors"), in_bf16(load_file(averaged / "checkpoints" / f"checkpoint-{step}" / EMA_FILE)))
    plain = runs.root / "plain"  # without the average: the trained weights
    assert_equal(load_file(plain / "sampled-2.safetensors"), in_bf16(masters(plain, 2)))


@pytest.mark.slow
def test_the_average_leaves_training_as_it_was_without_it(runs):
    plain, averaged = runs.root / "plain", runs.root / "averaged"
    # Validation at step 2 put the average into the masters and the engine's copies: both came back, or the
    # steps after it would have trained from other weights.
    for step in range(1, STEPS + 1):
        assert_equal(masters(averaged, step), masters(plain, step))
    assert_close(saved_unet(plain), masters(plain, STEPS))  # without the average: the last step's masters


@pytest.mark.slow
def test_a_resumed_run_continues_the_average_of_the_masters(runs):
    assert_close(saved_unet(runs.root / "resumed"), saved_unet(runs.root / "averaged"))
