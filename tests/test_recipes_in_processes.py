"""Every recipe in 2 CPU processes over gloo, under DDP and each shipped DeepSpeed config (ZeRO-2, ZeRO-2 with optimizer
offload, ZeRO-3): ControlNet with cached encoders and gradient checkpointing, DreamBooth with a LoRA and with the full UNet,
a LoRA with an 8-bit optimizer, a DoRA (lora.use_dora) that trains what one process trains; each resumes from its
checkpoint to the uninterrupted run's weights. The cells of README's
table "What is tested in which mode" that tests/test_distributed.py leaves out. One launch per mode."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file

from conftest import build_recipe
from distributed_worker import train_and_record
from ports import free_port
from test_distributed import RESUME_IS_EXACT, assert_same_update, assert_same_weights, deepspeed, launch, wait, write
from dora_helpers import DORA

from finetune.checkpoints.run_files import CONTROLNET_DIR, LORA_WEIGHTS_NAME
from finetune.toyworld.datasets import write_folder

pytestmark = pytest.mark.slow  # a launch of 9 runs per mode: about a minute each under DeepSpeed, 30 s under DDP

OFFLOAD, DDP = "zero2_offload.json", "ddp"
RESUMED = ("controlnet", "dreambooth-lora", "lora-8bit", "lora-dora")  # each trained 3 steps, and again from its checkpoint-2


@pytest.fixture(scope="module")
def dreambooth_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("concepts")
    return write_folder(root / "star", 2, seed=11), write_folder(root / "class", 2, seed=1, metadata=False)


def settings(pairs_folder: Path, dreambooth_folders: tuple[Path, Path], config: str, cache_dir: Path) -> dict[str, dict]:
    """Each run's recipe overrides (batch 1 per process)."""
    star, classes = dreambooth_folders
    concept = {"instance_dir": str(star), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(classes)}
    resuming = dict(train__max_steps=3, checkpoint__every_n_steps=2, train__gradient_checkpointing=True)
    cached = dict(train__cache_latents=True, train__cache_text_embeddings=True)
    # Optimizer offload runs DeepSpeed's own CPU Adam, and refuses an 8-bit optimizer (test_deepspeed_checks.py checks the line).
    eight_bit = {} if config == OFFLOAD else dict(optimizer__name="adamw8bit", lora__rank=64)  # rank 64: tensors of bitsandbytes' 4096 elements
    return {
        "controlnet": dict(method="controlnet", data__image_dir=str(pairs_folder), **cached, **resuming),
        "dreambooth-lora": dict(method="dreambooth", data__image_dir=None, dreambooth={"concepts": [concept], "adapter": "lora", "num_class_images": 2}, **resuming),
        "lora-8bit": dict(**eight_bit, train__max_steps=3, checkpoint__every_n_steps=2),
        "lora-dora": dict(**DORA, train__max_steps=3, checkpoint__every_n_steps=2),  # its magnitudes: one more trained weight per layer
        # Both processes encode into one cache folder (each its own slice of every batch).
        "dreambooth-full": dict(method="dreambooth", data__image_dir=None, optimizer__lr=1e-4, dreambooth={"concepts": [concept], "num_class_images": 2}, train__max_steps=2,
                                train__gradient_checkpointing=True, train__cache_dir=str(cache_dir), **cached),
    }  # fmt: skip


@pytest.fixture(scope="module", params=[DDP, "zero2.json", OFFLOAD, "zero3.json"])
def launched_runs(request, tiny_model, image_folder, pairs_folder, dreambooth_folders, tmp_path_factory) -> SimpleNamespace:
    config = request.param
    root = tmp_path_factory.mktemp(config.removesuffix(".json"))
    overrides = settings(pairs_folder, dreambooth_folders, config, root / "cache")
    arguments = []
    for name, extra in overrides.items():
        arguments.append(write(build_recipe(tiny_model, image_folder, root / name, train__batch_size=1, **extra), root / f"{name}.yaml"))
        if name in RESUMED:
            resumed = build_recipe(tiny_model, image_folder, root / f"{name}-resumed", train__batch_size=1, **extra)
            arguments += ["--resume", root / name / "checkpoints" / "checkpoint-2", write(resumed, root / f"{name}-resumed.yaml")]
    ddp = ["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]
    wait(launch(ddp if config == DDP else deepspeed(config), *arguments))
    return SimpleNamespace(root=root, config=config)


def outputs(out: Path) -> dict[str, torch.Tensor]:
    """The run's saved adapter, or its ControlNet, by parameter name."""
    if (out / LORA_WEIGHTS_NAME).is_file():
        return load_file(out / LORA_WEIGHTS_NAME)
    return ControlNetModel.from_pretrained(out / CONTROLNET_DIR).state_dict()


def test_each_method_resumes_from_its_checkpoint_to_the_uninterrupted_weights(launched_runs):
    for name in RESUMED:
        out = launched_runs.root / name
        if launched_runs.config != DDP:  # DeepSpeed's own checkpoint: one optimizer shard per process
            shards = sorted(p.name for p in (out / "checkpoints" / "checkpoint-2" / "pytorch_model").glob("*optim_states.pt"))
            assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], name
        uninterrupted, resumed = outputs(out), outputs(launched_runs.root / f"{name}-resumed")
        trained = [t for key, t in uninterrupted.items() if "lora.up" in key or key.startswith("controlnet_mid_block")]  # zero at the start
        assert trained and any(t.any() for t in trained), name
        # Bit for bit on the CPU under DDP and every ZeRO config (test_distributed.RESUME_IS_EXACT); under optimizer offload
        # because DeepSpeed's CPU Adam is handed back its bias-correction powers at a resume (finetune/checkpoints/cpu_adam_steps.py;
        # they rounded 1e-7 apart after the first resumed step, more after each next).
        assert_same_weights(resumed, uninterrupted, exact=RESUME_IS_EXACT)


@pytest.mark.parametrize("launched_runs", ["zero2.json", "zero3.json"], indirect=True)
def test_an_8bit_optimizer_keeps_8bit_states_in_deepspeeds_checkpoint(launched_runs):
    """DeepSpeed hands bitsandbytes its flat fp32 partition of the trained weights (one tensor per process), whose
    states are then 8-bit whole; DeepSpeed keeps them in each process's optimizer shard, and a resume reads them back
    (the test above)."""
    shard = launched_runs.root / "lora-8bit" / "checkpoints" / "checkpoint-2" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved = torch.load(shard, weights_only=False)["optimizer_state_dict"]  # DeepSpeed's, around bitsandbytes' own

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (dict, list, tuple)):
            for item in value.values() if isinstance(value, dict) else value:
                yield from tensors(item)

    dtypes = {t.dtype for t in tensors(saved)}
    assert torch.uint8 in dtypes and torch.float32 in dtypes  # the states; their scales and the fp32 weights


@pytest.fixture(scope="module")
def full_dreambooth_in_one_process(tiny_model, image_folder, pairs_folder, dreambooth_folders, tmp_path_factory) -> Path:
    """The full-UNet DreamBooth run in this process with the launch's global batch, without cached encoders."""
    root = tmp_path_factory.mktemp("one-process")
    extra = {**settings(pairs_folder, dreambooth_folders, "zero2.json", root / "unused")["dreambooth-full"], "train__cache_latents": False,
             "train__cache_text_embeddings": False, "train__cache_dir": None}  # fmt: skip
    recipe = build_recipe(tiny_model, image_folder, root / "dreambooth-full", train__batch_size=2, **extra)
    train_and_record([(str(write(recipe, root / "dreambooth-full.yaml")), None)])
    return root / "dreambooth-full"


def test_full_dreambooth_with_cached_encoders_trains_what_one_process_trains_without_them(launched_runs, full_dreambooth_in_one_process):
    out = launched_runs.root / "dreambooth-full"
    # Each process encoded its own images into the folder both share: every instance and class image once, each prompt once.
    cache = launched_runs.root / "cache"
    assert [len(list(cache.glob(f"{kind}-*/*.safetensors"))) for kind in ("latents", "text")] == [4, 2]
    gathered = UNet2DConditionModel.from_pretrained(out / "pipeline" / "unet").state_dict()
    expected = UNet2DConditionModel.from_pretrained(full_dreambooth_in_one_process / "pipeline" / "unet").state_dict()
    initial = {key.removeprefix("unet."): value for key, value in load_file(full_dreambooth_in_one_process / "initial.safetensors").items()}
    assert_same_update(gathered, expected, initial)


@pytest.fixture(scope="module")
def dora_in_one_process(tiny_model, image_folder, pairs_folder, dreambooth_folders, tmp_path_factory) -> Path:
    """The DoRA run in this process with the launch's global batch."""
    root = tmp_path_factory.mktemp("one-process-dora")
    extra = settings(pairs_folder, dreambooth_folders, "zero2.json", root / "unused")["lora-dora"]
    train_and_record([(str(write(build_recipe(tiny_model, image_folder, root / "lora-dora", train__batch_size=2, **extra), root / "lora-dora.yaml")), None)])
    return root / "lora-dora"


def test_a_dora_trains_what_one_process_trains(launched_runs, dora_in_one_process):
    """DoRA's magnitudes are one more trained weight in each adapted layer, beside its LoRA: DDP averages their gradients,
    DeepSpeed shards them with the rest (ZeRO-3: the frozen weight each magnitude's norm is taken of too)."""
    launched, single = (load_file(out / LORA_WEIGHTS_NAME) for out in (launched_runs.root / "lora-dora", dora_in_one_process))
    assert launched.keys() == single.keys() and any(key.endswith(".lora_magnitude_vector.weight") for key in launched)
    # Up to the order of float sums, measured 2.2e-6 apart at most (DDP; ZeRO-2 1.6e-6, offload 1.8e-6, ZeRO-3 2.0e-6) in
    # weights that 3 Adam steps of lr 1e-3 moved by up to 3e-3.
    apart = max((launched[key] - single[key]).abs().max().item() for key in launched)
    assert apart < 1e-5, apart
