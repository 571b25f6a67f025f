"""train.ema_decay under DeepSpeed with bf16 (ZeRO-2, ZeRO-3, and ZeRO-3 with the optimizer offloaded; two processes on
CPU), each passing the start-up check that the masters are where the average reads them: the average is of the
optimizer's fp32 master weights, step by step as the formula says, not of the engine's bf16 copies; validation
samples it and the run saves it; it leaves training as it was, and a resumed run continues it. The same of a LoRA's
average (and DreamBooth's LoRA), whose adapter file is the average. The LoRA runs of the same launch also count the
UNet's block calls: under the engine gradient checkpointing recomputes its blocks in backward, and without it none is."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import build_recipe
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from test_distributed import RESUME_IS_EXACT, assert_same_weights, deepspeed, launch, wait, write

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME, PIPELINE_DIR
from finetune.toyworld.datasets import write_folder
from finetune.training.ema import EMA_FILE

DECAY = 0.5  # the warm-up's (1 + n) / (10 + n) stays below it for these 4 steps
STEPS = 4


FULL = dict(method="full", train__batch_size=1, train__max_steps=STEPS, train__mixed_precision="bf16", optimizer__lr=1e-3,
            checkpoint__every_n_steps=2, validation__prompts=["a shape"], validation__every_n_steps=2,
            validation__num_inference_steps=2, validation__images_per_prompt=1)  # fmt: skip


def full_recipes(tiny_model, image_folder, root) -> dict:
    """A full fine-tune in bf16 without the average, with it, and (launched from the second's checkpoint-2) resumed."""
    return {name: build_recipe(tiny_model, image_folder, root / name, **({} if name == "plain" else {"train__ema_decay": DECAY}), **FULL)
            for name in ("plain", "averaged", "resumed")}  # fmt: skip


def full_runs(root, paths: dict) -> list:
    """The worker's arguments for full_recipes' runs, each recording its masters and the weights it samples with."""
    return ["--weights", paths["plain"], "--weights", paths["averaged"], "--weights", "--resume", root / "averaged" / "checkpoints" / "checkpoint-2", paths["resumed"]]


@pytest.fixture(scope="module", params=["zero2.json", "zero3.json"])
def runs(request, tiny_model, image_folder, tmp_path_factory) -> SimpleNamespace:
    """One launch per config: a full fine-tune in bf16 without the average and with it, each recording its fp32
    masters after every step and the weights validation samples with (tests/distributed_worker.py --weights), with
    validation at steps 2 and 4; and the averaged run resumed from its checkpoint-2. Then the same for a LoRA in bf16 without
    validation (the averaged one with gradient checkpointing; both count their UNet block calls, --forwards), and a DreamBooth
    LoRA with the average."""
    root = tmp_path_factory.mktemp(request.param.removesuffix(".json"))
    recipes = full_recipes(tiny_model, image_folder, root)
    lora = dict(train__batch_size=1, train__max_steps=STEPS, train__mixed_precision="bf16", optimizer__lr=1e-3, checkpoint__every_n_steps=2)
    averaged_lora = dict(train__ema_decay=DECAY, train__gradient_checkpointing=True, **lora)
    concept = {"instance_dir": str(write_folder(root / "star", 2, seed=11)), "instance_prompt": "a sks shape", "class_prompt": "a shape",
               "class_dir": str(write_folder(root / "class", 2, seed=1, metadata=False))}  # fmt: skip
    recipes |= {
        "lora-plain": build_recipe(tiny_model, image_folder, root / "lora-plain", **lora),
        "lora-averaged": build_recipe(tiny_model, image_folder, root / "lora-averaged", **averaged_lora),
        "lora-resumed": build_recipe(tiny_model, image_folder, root / "lora-resumed", **averaged_lora),
        "dreambooth-averaged": build_recipe(tiny_model, image_folder, root / "dreambooth-averaged", method="dreambooth", data__image_dir=None,
                                            dreambooth={"concepts": [concept], "adapter": "lora", "num_class_images": 2}, train__ema_decay=DECAY, **lora),
    }  # fmt: skip
    paths = {name: write(recipe, root / f"{name}.yaml") for name, recipe in recipes.items()}
    wait(launch(deepspeed(request.param), *full_runs(root, paths), "--weights", "--forwards", paths["lora-plain"], "--weights", "--forwards", paths["lora-averaged"],
                "--resume", root / "lora-averaged" / "checkpoints" / "checkpoint-2", paths["lora-resumed"], "--weights", paths["dreambooth-averaged"]))  # fmt: skip
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
    assert_average_of_the_masters(runs.root)


def assert_average_of_the_masters(root) -> None:
    run = root / "averaged"
    assert_close(load_file(run / "checkpoints" / "checkpoint-2" / EMA_FILE), expected_average(run, 2))
    assert_close(load_file(run / "checkpoints" / f"checkpoint-{STEPS}" / EMA_FILE), expected_average(run, STEPS))
    assert_close(saved_unet(run), expected_average(run, STEPS))
    # The engine's bf16 copies are measurably other weights than the masters (what this test tells apart).
    last = masters(run, STEPS)
    assert any(not torch.allclose(t.bfloat16().float(), last[name], rtol=0, atol=1e-6) for name, t in last.items())


@pytest.mark.slow
def test_validation_samples_with_the_average_in_the_engines_bf16_weights(runs):
    assert_validation_samples_the_average(runs.root)


def assert_validation_samples_the_average(root) -> None:
    averaged = root / "averaged"
    for step in (2, STEPS):  # the checkpoint of the same step holds that average
        assert_equal(load_file(averaged / f"sampled-{step}.safetensors"), in_bf16(load_file(averaged / "checkpoints" / f"checkpoint-{step}" / EMA_FILE)))
    plain = root / "plain"  # without the average: the trained weights
    assert_equal(load_file(plain / "sampled-2.safetensors"), in_bf16(masters(plain, 2)))


@pytest.mark.slow
def test_the_average_leaves_training_as_it_was_without_it(runs):
    assert_training_as_without_the_average(runs.root)


def assert_training_as_without_the_average(root) -> None:
    plain, averaged = root / "plain", root / "averaged"
    # Validation at step 2 put the average into the masters and the engine's copies: both came back, or the
    # steps after it would have trained from other weights.
    for step in range(1, STEPS + 1):
        assert_equal(masters(averaged, step), masters(plain, step))
    assert_close(saved_unet(plain), masters(plain, STEPS))  # without the average: the last step's masters


@pytest.mark.slow
def test_a_resumed_run_continues_the_average_of_the_masters(runs):
    # Bit for bit on the CPU: the checkpoint keeps the fp32 average (ema.safetensors) beside the masters and optimizer.
    assert_same_weights(saved_unet(runs.root / "resumed"), saved_unet(runs.root / "averaged"), exact=RESUME_IS_EXACT)


@pytest.fixture(scope="module")
def offloaded(tiny_model, image_folder, tmp_path_factory):
    """full_recipes' runs under ZeRO-3 with the optimizer offloaded (configs/deepspeed/zero3_offload.json):
    the fp32 masters in CPU memory, stepped by DeepSpeed's CPU Adam. The average reads each process's partition there,
    where DeepSpeed's safe_get_local_fp32_param would copy it to the process's device (a GPU), and is kept beside it."""
    root = tmp_path_factory.mktemp("zero3-offload")
    paths = {name: write(recipe, root / f"{name}.yaml") for name, recipe in full_recipes(tiny_model, image_folder, root).items()}
    wait(launch(deepspeed("zero3_offload.json"), *full_runs(root, paths)))
    return root


@pytest.mark.slow  # the full fine-tunes alone (a LoRA's shard is read as under zero3.json): about a minute
def test_under_an_offloaded_zero3_optimizer_the_average_is_of_the_masters_as_without_offload(offloaded):
    assert_average_of_the_masters(offloaded)
    assert_validation_samples_the_average(offloaded)
    assert_training_as_without_the_average(offloaded)
    # Resumed, the training is the uninterrupted run's (DeepSpeed's CPU Adam given back its bias-correction powers:
    # finetune/checkpoints/cpu_adam_steps.py), and the average continues from checkpoint-2's over those masters.
    resumed, average = offloaded / "resumed", load_file(offloaded / "averaged" / "checkpoints" / "checkpoint-2" / EMA_FILE)
    for step in range(3, STEPS + 1):
        assert_equal(masters(resumed, step), masters(offloaded / "averaged", step))
    for n in range(2, STEPS):
        for name, master in masters(resumed, n + 1).items():
            average[name].lerp_(master, 1 - min(DECAY, (1 + n) / (10 + n)))
    assert_close(load_file(resumed / "checkpoints" / f"checkpoint-{STEPS}" / EMA_FILE), average)
    assert_close(saved_unet(resumed), average)
    assert_same_weights(saved_unet(resumed), saved_unet(offloaded / "averaged"), exact=RESUME_IS_EXACT)


def in_adapter_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's names of a UNet LoRA's weights (as trained) as the adapter file writes them (diffusers')."""
    return {name.replace(".lora_A.default.weight", ".lora.down.weight").replace(".lora_B.default.weight", ".lora.up.weight"): t for name, t in weights.items()}


@pytest.mark.slow
def test_a_lora_average_is_of_the_fp32_masters_in_the_checkpoints_and_the_adapter(runs):
    for name in ("lora-averaged", "dreambooth-averaged"):
        run = runs.root / name
        for step in (2, STEPS):
            assert_close(load_file(run / "checkpoints" / f"checkpoint-{step}" / EMA_FILE), expected_average(run, step))
        assert_close(load_file(run / LORA_WEIGHTS_NAME), in_adapter_names(expected_average(run, STEPS)))
        last = masters(run, STEPS)  # masters that bf16 would round: an average of the engine's copies is another
        assert any(not torch.allclose(t.bfloat16().float(), t, rtol=0, atol=1e-6) for name, t in last.items() if ".lora_B." in name)
    plain = runs.root / "lora-plain"  # without the average: the last step's masters
    assert_close(load_file(plain / LORA_WEIGHTS_NAME), in_adapter_names(masters(plain, STEPS)))
    # The average and gradient checkpointing left each step's masters as they were without them, bit for bit.
    for step in range(1, STEPS + 1):
        assert_equal(masters(runs.root / "lora-averaged", step), masters(plain, step))


@pytest.mark.slow
def test_a_resumed_lora_run_continues_the_average_of_the_masters(runs):
    assert_same_weights(load_file(runs.root / "lora-resumed" / LORA_WEIGHTS_NAME), load_file(runs.root / "lora-averaged" / LORA_WEIGHTS_NAME), exact=RESUME_IS_EXACT)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_the_unets_blocks_in_backward_under_deepspeed(runs):
    """Calls per process of each block diffusers checkpoints (and of conv_in, which it does not), over STEPS steps of one
    forward each: the recomputation in backward is a second call. Two blocks need none: down_blocks.0.resnets.0, before
    the first LoRA layer, computes nothing that trains (torch's checkpoint recomputes only what backward needs), and
    diffusers calls mid_block.resnets.0 outside its checkpoint."""
    once = {"conv_in", "down_blocks.0.resnets.0", "mid_block.resnets.0"}
    for rank in (0, 1):
        plain = json.loads((runs.root / "lora-plain" / f"forwards-rank{rank}.json").read_text())
        checkpointed = json.loads((runs.root / "lora-averaged" / f"forwards-rank{rank}.json").read_text())
        assert len(plain) > len(once) and plain == dict.fromkeys(plain, STEPS)
        assert checkpointed == {name: STEPS if name in once else 2 * STEPS for name in plain}
