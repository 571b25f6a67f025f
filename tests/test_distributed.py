"""Several processes on CPU (gloo): DDP on one machine, two "machines" on loopback, DeepSpeed ZeRO-2 with optimizer
offload and ZeRO-3 (ZeRO-2 itself, launched from the top-level accelerate config: tests/test_deepspeed_zero2.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from distributed_worker import train_and_record
from conftest import build_recipe
from dora_helpers import DORA
from same_weights import RESUME_IS_EXACT, assert_same_update, assert_same_weights, lora_start
from ports import free_port
from safetensors.torch import load_file

from finetune.checkpoints.run_files import CONTROLNET_DIR, LORA_WEIGHTS_NAME
from finetune.checkpoints.run_files import list_checkpoints
from finetune.distributed.processes import agree_on_start
from finetune.errors import FinetuneError
from finetune.toyworld.datasets import write_folder
from finetune.training.trainer import train

WORKER = Path(__file__).parent / "distributed_worker.py"
REPO = Path(__file__).resolve().parent.parent


def launch(args: list[str], *recipe_paths: Path | str) -> subprocess.Popen:
    """Train the recipes one after the other in one launch of the worker (see tests/distributed_worker.py);
    "--resume", CHECKPOINT among the paths resumes the next one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --multi_gpu picks the torchrun launcher; with no GPU there, accelerate runs the processes on CPU with gloo.
    mode = [] if {"--use_deepspeed", "--config_file"} & set(args) else ["--multi_gpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--mixed_precision", "no", "--dynamo_backend", "no",
               *args, str(WORKER), *map(str, recipe_paths)]
    # From the repository's root, as the README launches: the top-level config names configs/deepspeed/zero2.json.
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def deepspeed(config: str) -> list[str]:
    """Launch arguments for 2 processes under DeepSpeed with one of the shipped configs (CPU: gloo)."""
    path = REPO / "configs" / "deepspeed" / config
    return ["--use_deepspeed", "--deepspeed_config_file", str(path), "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]


def write(recipe, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path


def wait(process: subprocess.Popen) -> None:
    # A hang only: a DeepSpeed launch on a clean machine first builds DeepSpeed's shared-memory op (about a minute of 2 cores,
    # or a wait on the other worker's build), and a launch took 30 to 36 s here with the op built, under load.
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


WIDE, TALL = (96, 48), (48, 96)
BORROWING = [WIDE] * 3 + [TALL]  # on 2 processes of batch 1, each bucket's last global batch borrows an image (test_borrowed_images)


def mixed_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    root.mkdir()
    for i, (width, height) in enumerate(sizes):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a red striped circle")
    return root


def borrowing_run(folder: Path) -> dict:
    """Recipe overrides: the epoch's 3 global batches of BORROWING's images and 1 of the next, at accumulation 2."""
    data = {"image_dir": str(folder), "resolution": 64, "bucketing": {"enabled": True, "step": 16}}
    return dict(data=data, train__max_steps=2, train__gradient_accumulation_steps=2)


def assert_one_process_trains_what_two_did(two_processes: Path, run: dict, make_recipe, tmp_path: Path) -> None:
    """`two_processes`: the output folder of `run` (borrowing_run's overrides) launched on 2 processes of batch 1."""
    one_process = make_recipe(output_dir=str(tmp_path / "one"), train__batch_size=2, **run)
    train(one_process)
    two, one = load_file(two_processes / LORA_WEIGHTS_NAME), load_file(tmp_path / "one" / LORA_WEIGHTS_NAME)
    # As a whole (assert_same_update): under ATen's default kernels one weight of the mid block's attn2.to_q, whose gradient
    # is little but rounding, ended 2.3e-6 apart (Adam steps it by about lr whatever its size).
    assert_same_update(two, one, lora_start(one))


@pytest.fixture(scope="module")
def ddp(tiny_model, image_folder, pairs_folder, tmp_path_factory) -> SimpleNamespace:
    """The DDP runs of the tests below in one launch of 2 processes (a launch starts two interpreters):
    LoRA, and again from its checkpoint-2 (lora-resumed-ddp); DreamBooth (instance and class halves, LoRA on the UNet and the
    text encoder: two wrapped models; gradient checkpointing); ControlNet (with cached encoders, random flips, accumulation, an
    8-bit optimizer); a DoRA (lora.use_dora) with aspect-ratio buckets of 3 images, whose global batches of 3 split 2 + 1 over the processes;
    a LoRA whose buckets' last global batches borrow images (borrowing, checked by tests/test_borrowed_images.py's test below);
    before them a LoRA run that a Ctrl-C reaching rank 1 alone stops (stopped-ddp, checked by the stop test below); a LoRA and a
    ControlNet that draw validation grids, counting each rank's UNet forwards (grid-lora, grid-controlnet). `settings`:
    each run's recipe overrides and its batch per process, for the single-process runs the tests compare with (twice the batch)."""
    root = tmp_path_factory.mktemp("ddp")
    mixed = mixed_folder(root / "mixed", [WIDE] * 3 + [TALL] * 3)
    star = write_folder(root / "star", 2, seed=11, include_held_out="only_shape")
    concept = {"instance_dir": str(star), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(root / "class")}
    settings = {
        "lora": (dict(train__max_steps=3, train__gradient_accumulation_steps=2, data__random_flip=True, checkpoint__every_n_steps=2), 1),
        "dreambooth": (dict(method="dreambooth", data__image_dir=None, train__max_steps=3, data__random_flip=True, train__gradient_checkpointing=True,
                            dreambooth={"concepts": [concept], "adapter": "lora", "train_text_encoder": True, "num_class_images": 2,
                                        "class_generation": {"num_inference_steps": 2, "batch_size": 1}}), 1),
        "controlnet": (dict(method="controlnet", data__image_dir=str(pairs_folder), train__max_steps=2, train__gradient_accumulation_steps=2,
                            data__random_flip=True, train__cache_latents=True, train__cache_text_embeddings=True, optimizer__name="adamw8bit"), 1),
        "buckets-dora": (dict(data={"image_dir": str(mixed), "resolution": 64, "bucketing": {"enabled": True, "step": 16}}, train__max_steps=2, **DORA), 2),
        "borrowing": (borrowing_run(mixed_folder(root / "borrowing", BORROWING)), 1),
    }  # fmt: skip
    # Validation grids (step 0's and step 1's) of two batches each: its prompts' guidance differs.
    grid = dict(train__max_steps=1, validation={"prompts": ["a red circle --l 5", "a blue square --l 3"], "num_inference_steps": 2, "images_per_prompt": 2})
    settings.update({"grid-lora": (grid, 1), "grid-controlnet": (dict(method="controlnet", data__image_dir=str(pairs_folder), **grid), 1)})
    recipes = {name: build_recipe(tiny_model, image_folder, root / f"{name}-ddp", train__batch_size=batch, **extra) for name, (extra, batch) in settings.items()}
    stopped = build_recipe(tiny_model, image_folder, root / "stopped-ddp", train__batch_size=1, train__max_steps=8)
    resumed = build_recipe(tiny_model, image_folder, root / "lora-resumed-ddp", train__batch_size=1, **settings["lora"][0])
    wait(launch(["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())],
                "--interrupt", "1:3", write(stopped, root / "stopped-ddp.yaml"),  # first: the runs after it train as usual
                *[arg for name, recipe in recipes.items() for arg in ["--forwards"] * name.startswith("grid") + [write(recipe, root / f"{name}-ddp.yaml")]],
                "--resume", root / "lora-ddp" / "checkpoints" / "checkpoint-2", write(resumed, root / "lora-resumed-ddp.yaml")))  # fmt: skip
    return SimpleNamespace(root=root, settings=settings)


def test_ddp_two_processes_match_each_other_and_one_process_with_the_same_global_batch(ddp, make_recipe, tmp_path):
    out = ddp.root / "lora-ddp"
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert_same_weights(rank0, rank1, exact=True)  # DDP keeps the ranks in lockstep

    extra, batch = ddp.settings["lora"]
    one_process = make_recipe(output_dir=str(tmp_path / "single"), train__batch_size=2 * batch, **extra)
    train(one_process)
    ddp_file = load_file(out / LORA_WEIGHTS_NAME)
    single_file = load_file(Path(one_process.output_dir) / LORA_WEIGHTS_NAME)
    # Same global batch of the same images with the same noise: the same update up to the order of float sums.
    assert_same_update(ddp_file, single_file, lora_start(single_file))
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ddp_file.items() if "lora.up" in k)
    # Resumed from step 2, it ends where the uninterrupted launch did.
    assert_same_weights(load_file(ddp.root / "lora-resumed-ddp" / LORA_WEIGHTS_NAME), ddp_file, exact=RESUME_IS_EXACT)


def test_ddp_dreambooth_controlnet_and_a_bucketed_dora_match_one_process_with_the_same_global_batch(ddp, make_recipe, tmp_path):
    names = ("dreambooth", "controlnet", "buckets-dora")
    assert len(list((ddp.root / "class").glob("*.png"))) == 2  # made by the two processes, reused below
    single = {}
    for name in names:
        extra, batch = ddp.settings[name]
        single[name] = write(make_recipe(output_dir=str(tmp_path / f"{name}-single"), train__batch_size=2 * batch, **extra), tmp_path / f"{name}.yaml")
    train_and_record([(str(path), None) for path in single.values()])  # the worker's runs in this process: the same global batches

    for name in names:
        out, single_out = ddp.root / f"{name}-ddp", tmp_path / f"{name}-single"
        rank0 = load_file(out / "rank0.safetensors")
        assert_same_weights(rank0, load_file(out / "rank1.safetensors"), exact=True)  # DDP keeps the ranks in lockstep
        assert_same_update(rank0, load_file(single_out / "rank0.safetensors"), load_file(out / "initial.safetensors"))
    # DoRA's magnitudes, averaged by DDP as the LoRA's weights are, train to where one process's do, as a whole update of
    # their own (measured: 5e-6 of it apart; the whole update above: 1.6e-4 of it, one near-zero gradient's Adam step of a LoRA weight).
    out = ddp.root / "buckets-dora-ddp"

    def magnitudes(path: Path) -> dict:
        return {key: tensor for key, tensor in load_file(path).items() if "lora_magnitude_vector" in key}

    ddp_run, single_run, initial = map(magnitudes, (out / "rank0.safetensors", tmp_path / "buckets-dora-single" / "rank0.safetensors", out / "initial.safetensors"))
    assert ddp_run and not any(torch.equal(ddp_run[k], initial[k]) for k in ddp_run)
    assert_same_update(ddp_run, single_run, initial)
    assert any(key.endswith(".lora_magnitude_vector.weight") for key in load_file(out / LORA_WEIGHTS_NAME))  # the file diffusers loads
    adapter = load_file(ddp.root / "dreambooth-ddp" / LORA_WEIGHTS_NAME)
    assert any(k.startswith("text_encoder.") for k in adapter) and any(k.startswith("unet.") for k in adapter)
    saved = ControlNetModel.from_pretrained(ddp.root / "controlnet-ddp" / CONTROLNET_DIR).state_dict()
    assert_same_weights({f"controlnet.{k}": v for k, v in saved.items()}, load_file(ddp.root / "controlnet-ddp" / "rank0.safetensors"), exact=True)


def test_two_processes_share_the_validation_grid_and_save_the_grid_one_process_draws(ddp, make_recipe, tmp_path):
    """Each process drew one of each grid's two batches (the UNet's forwards: training's, alike, and half the sampling's),
    and the main process saved the grid one process draws, pixel for pixel: step 0's (a step trains weights that
    differ by the order of float sums). ControlNet's rows also start with the conditioning image every process has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launch's processes (OMP_NUM_THREADS=1): a thread count may round otherwise
    try:
        for name in ("grid-lora", "grid-controlnet"):
            out = ddp.root / f"{name}-ddp"
            forwards = [json.loads((out / f"forwards-rank{rank}.json").read_text())["conv_in"] for rank in (0, 1)]
            assert forwards[0] == forwards[1], forwards  # rank 0 drew every image, rank 1 none, before they shared
            extra, batch = ddp.settings[name]
            single = make_recipe(output_dir=str(tmp_path / name), train__batch_size=2 * batch, **extra)
            train(single)
            grids = [np.asarray(Image.open(folder / "samples" / "step-000000.png")) for folder in (out, Path(single.output_dir))]
            assert grids[0].shape == grids[1].shape and np.array_equal(grids[0], grids[1]), name
            assert (out / "samples" / "step-000001.png").exists()
    finally:
        torch.set_num_threads(threads)


def test_a_stop_that_reaches_one_process_stops_both_at_the_same_step_with_one_checkpoint(ddp):
    """Rank 1 alone got a Ctrl-C after step 3 (a signal sent to one process, or to one machine's): both processes stopped
    at step 4, the step after the request (finetune.distributed.stopping), wrote one checkpoint, and the launch went on."""
    out = ddp.root / "stopped-ddp"
    assert [path.name for path in list_checkpoints(out / "checkpoints")] == ["checkpoint-4"]
    assert not (out / LORA_WEIGHTS_NAME).exists()  # stopped: no outputs
    assert_same_weights(load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors"), exact=True)


def test_two_processes_train_what_one_does_when_a_buckets_last_batch_borrows_images(ddp, make_recipe, tmp_path):
    """tests/test_borrowed_images.py's launched case, run in this file's launch (one fewer launch in the suite)."""
    assert_one_process_trains_what_two_did(ddp.root / "borrowing-ddp", ddp.settings["borrowing"][0], make_recipe, tmp_path)


def test_two_machines_of_one_process_each_on_loopback(ddp, make_recipe, tmp_path):
    extra, batch = ddp.settings["lora"]
    two_processes = make_recipe(output_dir=str(tmp_path / "machines"), train__batch_size=batch, **extra)
    path = write(two_processes, tmp_path / "machines.yaml")
    port = str(free_port())
    common = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    machines = [launch([*common, "--machine_rank", str(rank)], path) for rank in (0, 1)]
    for machine in machines:
        wait(machine)
    out = Path(two_processes.output_dir)
    assert_same_weights(load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors"), exact=True)
    # What two processes on one machine trained (the test above: that is what one process trains).
    trained, on_one_machine = load_file(out / LORA_WEIGHTS_NAME), load_file(ddp.root / "lora-ddp" / LORA_WEIGHTS_NAME)
    if RESUME_IS_EXACT:  # bit for bit on the CPU: gloo sums the 2 processes' gradients in one order on any machines
        assert_same_weights(trained, on_one_machine, exact=True)
    else:  # a GPU's collectives may sum in another order for another topology
        assert_same_update(trained, on_one_machine, lora_start(on_one_machine))


@pytest.fixture(scope="module")
def zero3(tiny_model, image_folder, pairs_folder, tmp_path_factory) -> SimpleNamespace:
    """The runs of the three ZeRO-3 tests below in one launch of zero3.json (each launch starts two
    interpreters and DeepSpeed); each test checks its own runs. `settings`: each run's recipe overrides,
    for the single-process runs the tests compare with; `recipes`: each run's recipe; `root`: their folder."""
    root = tmp_path_factory.mktemp("zero3")
    star, classes = write_folder(root / "star", 2, seed=11, include_held_out="only_shape"), write_folder(root / "class", 2, seed=1, metadata=False)
    generation = {"num_inference_steps": 2, "batch_size": 1}
    sampling = dict(validation__prompts=["a sks shape"], validation__num_inference_steps=2, validation__images_per_prompt=1)
    resuming = dict(train__max_steps=4, data__random_flip=True, checkpoint__every_n_steps=2)
    bf16 = dict(train__max_steps=2, train__mixed_precision="bf16", checkpoint__every_n_steps=1,
                validation__prompts=["a shape"], validation__num_inference_steps=2, validation__images_per_prompt=1)  # fmt: skip
    settings = {
        # sample and gather: full-UNet DreamBooth (class images generated) and ControlNet
        "dreambooth-sharded": dict(method="dreambooth", data__image_dir=None, train__max_steps=2, optimizer__lr=1e-4, dreambooth={
            "concepts": [{"instance_dir": str(star), "instance_prompt": "a sks shape", "class_prompt": ["a shape", "a red shape"]}],
            "num_class_images": 2, "class_generation": generation}, **sampling),  # fmt: skip
        "controlnet-sharded": dict(method="controlnet", data__image_dir=str(pairs_folder), train__max_steps=2, **sampling),
        # resume: full DreamBooth and LoRA, each uninterrupted, then resumed from its checkpoint-2
        "dreambooth-uninterrupted": dict(method="dreambooth", data__image_dir=None, optimizer__lr=1e-4, dreambooth={
            "concepts": [{"instance_dir": str(star), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(classes)}],
            "num_class_images": 2}, **resuming),  # fmt: skip
        "lora-uninterrupted": dict(**resuming),
        # bf16: every method
        "lora-bf16": dict(**bf16),
        "controlnet-bf16": dict(method="controlnet", data__image_dir=str(pairs_folder), **bf16),
        "dreambooth-bf16": dict(method="dreambooth", data__image_dir=None, optimizer__lr=1e-4, dreambooth={
            "concepts": [{"instance_dir": str(star), "instance_prompt": "a sks shape", "class_prompt": "a shape"}],
            "num_class_images": 2, "class_generation": generation}, **bf16),  # fmt: skip
    }
    settings["dreambooth-resumed"], settings["lora-resumed"] = settings["dreambooth-uninterrupted"], settings["lora-uninterrupted"]
    recipes = {name: build_recipe(tiny_model, image_folder, root / name, train__batch_size=1, **extra) for name, extra in settings.items()}
    arguments = []
    for name in ("dreambooth-sharded", "controlnet-sharded", "dreambooth-uninterrupted", "dreambooth-resumed", "lora-uninterrupted",
                 "lora-resumed", "lora-bf16", "controlnet-bf16", "dreambooth-bf16"):  # fmt: skip
        if name.endswith("-resumed"):
            arguments += ["--resume", str(root / name.replace("resumed", "uninterrupted") / "checkpoints" / "checkpoint-2")]
        arguments.append(write(recipes[name], root / f"{name}.yaml"))
    wait(launch(deepspeed("zero3.json"), *arguments))
    return SimpleNamespace(root=root, settings=settings, recipes=recipes)


@pytest.mark.slow  # the ZeRO-3 launch (nine runs, two interpreters, DeepSpeed) takes about a minute of the default suite's budget
def test_deepspeed_zero3_dreambooth_and_controlnet_sample_and_gather_what_one_process_trains(zero3, make_recipe, tmp_path):
    """Full-UNet DreamBooth and ControlNet under ZeRO-3: both sample validation images with sharded
    weights and save the gathered model one process trains."""
    for name in ("dreambooth-sharded", "controlnet-sharded"):
        out = zero3.root / name
        assert all(t.numel() == 0 for t in load_file(out / "rank0.safetensors").values())  # ZeRO-3: outside the gather each process holds a shard
        # Sampling needs every process under ZeRO-3 (a main-process-only forward would wait forever).
        assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000002.png"]
    out = zero3.root / "dreambooth-sharded"
    assert len(list((out / "class_images" / "concept-0").glob("*.png"))) == 2  # generated before prepare, split across the processes

    single = make_recipe(output_dir=str(tmp_path / "dreambooth-single"), train__batch_size=2, **zero3.settings["dreambooth-sharded"])
    train(single)
    gathered = UNet2DConditionModel.from_pretrained(out / "pipeline" / "unet").state_dict()
    expected = UNet2DConditionModel.from_pretrained(Path(single.output_dir) / "pipeline" / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(Path(single.model.pretrained) / "unet").state_dict()
    assert_same_update(gathered, expected, base)  # measured: a difference of 1.9e-3 x the update

    out = zero3.root / "controlnet-sharded"
    single = make_recipe(output_dir=str(tmp_path / "controlnet-single"), train__batch_size=2, **zero3.settings["controlnet-sharded"])
    train(single)
    gathered = ControlNetModel.from_pretrained(out / CONTROLNET_DIR).state_dict()
    expected = ControlNetModel.from_pretrained(Path(single.output_dir) / CONTROLNET_DIR).state_dict()
    assert_same_update(gathered, expected, {key.removeprefix("controlnet."): value for key, value in load_file(out / "initial.safetensors").items()})


@pytest.mark.slow  # the ZeRO-3 launch (nine runs, two interpreters, DeepSpeed) takes about a minute of the default suite's budget
def test_deepspeed_zero3_resumes_full_dreambooth_and_lora_where_they_stopped(zero3):
    """Under ZeRO-3 each process's checkpoint holds its shard of the weights and optimizer; a run resumed
    from step 2 ends with the uninterrupted run's full UNet (DreamBooth) and adapter (LoRA), bit for bit on the CPU."""
    root = zero3.root
    shards = root / "dreambooth-uninterrupted" / "checkpoints" / "checkpoint-2" / "pytorch_model"
    assert sorted(p.name for p in shards.glob("*model_states.pt")) == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    unets = [UNet2DConditionModel.from_pretrained(root / f"dreambooth-{run}" / "pipeline" / "unet").state_dict() for run in ("uninterrupted", "resumed")]
    base = UNet2DConditionModel.from_pretrained(Path(zero3.recipes["lora-uninterrupted"].model.pretrained) / "unet").state_dict()
    assert not all(torch.equal(unets[0][key], base[key]) for key in base)  # it trained
    assert_same_weights(unets[1], unets[0], exact=RESUME_IS_EXACT)
    adapters = [load_file(root / f"lora-{run}" / LORA_WEIGHTS_NAME) for run in ("uninterrupted", "resumed")]
    assert any(t.any() for k, t in adapters[0].items() if "lora.up" in k)
    assert_same_weights(adapters[1], adapters[0], exact=RESUME_IS_EXACT)
    # Each checkpoint also holds the outputs of its step (checkpoint.save_outputs), gathered whole.
    checkpoint = {name: root / f"{name}-uninterrupted" / "checkpoints" / "checkpoint-2" for name in ("dreambooth", "lora")}
    at_step_2 = load_file(checkpoint["lora"] / LORA_WEIGHTS_NAME)
    assert {k: t.shape for k, t in at_step_2.items()} == {k: t.shape for k, t in adapters[0].items()}
    assert not any(torch.equal(at_step_2[k], adapters[0][k]) for k in at_step_2 if "lora.up" in k)
    unet_at_step_2 = UNet2DConditionModel.from_pretrained(checkpoint["dreambooth"] / "pipeline" / "unet").state_dict()
    assert not all(torch.equal(unet_at_step_2[key], unets[0][key]) for key in base)
    assert not all(torch.equal(unet_at_step_2[key], base[key]) for key in base)


@pytest.mark.slow  # the ZeRO-3 launch (nine runs, two interpreters, DeepSpeed) takes about a minute of the default suite's budget
def test_deepspeed_bf16_trains_samples_and_saves_every_method(zero3):
    """DeepSpeed holds the trained model in bf16 and accelerate's autocast is off there: fp32 inputs
    met bf16 weights (every method failed at its first step). ZeRO-3, the three methods after fp32 runs
    in the same launch; the outputs carry the fp32 master weights."""
    for name in ("lora-bf16", "controlnet-bf16", "dreambooth-bf16"):
        out = zero3.root / name
        assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000002.png"], name
        assert (out / "checkpoints" / "checkpoint-2").is_dir(), name
    adapter = load_file(zero3.root / "lora-bf16" / LORA_WEIGHTS_NAME)
    assert any(t.any() for k, t in adapter.items() if "lora.up" in k) and all(t.isfinite().all() for t in adapter.values())
    # Saved from the optimizer's fp32 masters, not the engine's bf16 copy (which rounds small updates away).
    assert not all(torch.equal(t, t.bfloat16().float()) for t in adapter.values())
    controlnet = ControlNetModel.from_pretrained(zero3.root / "controlnet-bf16" / CONTROLNET_DIR).state_dict()
    assert any(t.any() for k, t in controlnet.items() if k.startswith("controlnet_mid_block"))
    pipeline = StableDiffusionPipeline.from_pretrained(zero3.root / "dreambooth-bf16" / "pipeline")
    source = StableDiffusionPipeline.from_pretrained(zero3.recipes["dreambooth-bf16"].model.pretrained)
    assert not torch.equal(pipeline.unet.conv_out.weight, source.unet.conv_out.weight)  # it trained
    assert not torch.equal(pipeline.unet.conv_out.weight, pipeline.unet.conv_out.weight.bfloat16().float())  # fp32 masters
    assert all(torch.equal(t, source.vae.state_dict()[k]) for k, t in pipeline.vae.state_dict().items())  # reloaded, not bf16-rounded


@pytest.mark.slow  # DeepSpeed compiles its CPU Adam on first use: over a minute of a 2-core machine before the first step
def test_deepspeed_zero2_offload_controlnet_saves_the_single_process_controlnet(make_recipe, pairs_folder, tmp_path):
    """ControlNet under ZeRO-2 with the optimizer offloaded to CPU (DeepSpeed's own CPU Adam, built on first use)."""
    common = dict(method="controlnet", data__image_dir=str(pairs_folder), train__max_steps=2, checkpoint__every_n_steps=1)
    offloaded = make_recipe(output_dir=str(tmp_path / "offload"), train__batch_size=1, **common)
    wait(launch(deepspeed("zero2_offload.json"), write(offloaded, tmp_path / "offload.yaml")))
    out = Path(offloaded.output_dir)
    assert len(list((out / "checkpoints" / "checkpoint-1" / "pytorch_model").glob("*optim_states.pt"))) == 2

    single = make_recipe(output_dir=str(tmp_path / "single"), train__batch_size=2, **common)
    train(single)
    got = ControlNetModel.from_pretrained(out / CONTROLNET_DIR).state_dict()
    expected = ControlNetModel.from_pretrained(Path(single.output_dir) / CONTROLNET_DIR).state_dict()
    initial = {key.removeprefix("controlnet."): value for key, value in load_file(out / "initial.safetensors").items()}
    assert_same_update(got, expected, initial)
    assert any(tensor.any() for key, tensor in got.items() if key.startswith("controlnet_mid_block"))  # it trained


def test_processes_that_would_start_at_different_steps_are_one_line_not_a_hang(tmp_path):
    """Each process finds --resume latest's checkpoint on its own machine's disk: where output_dir is not shared,
    one would start over while the others resume, and their collectives would wait on each other for ever."""
    def accelerator(steps: list[int]):
        return SimpleNamespace(num_processes=len(steps), device=torch.device("cpu"), print=print, gather=lambda mine: torch.tensor(steps))

    agree_on_start(accelerator([4, 4]), 4, tmp_path, latest=True)
    with pytest.raises(FinetuneError, match=r"^the processes would start at different steps \(4, 0, by rank\): .* output_dir must be a folder every machine shares"):
        agree_on_start(accelerator([4, 0]), 4, tmp_path, latest=True)
