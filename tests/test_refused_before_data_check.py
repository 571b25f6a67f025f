"""`finetune train` makes train()'s refusals of the run itself before its data check decodes every image (minutes for a
large folder): they came only from inside train(), once every image had been decoded (finetune/cli/run_refusals.py). Each test
runs the command with the data check and the training stack standing in as failures: the refusal must come first."""

import json
from pathlib import Path
import shutil
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO, SHIPPED_BASE

from finetune.checkpoints.run_files import CONTROLNET_DIR, METADATA_FILE
from finetune.cli.main import main
import finetune.cli.train_command
from finetune.config.recipe_loading import load_recipe
import finetune.data_check.train_inputs


@pytest.fixture
def refused_first(monkeypatch, capsys):
    """Runs `finetune train ARGS`, with the data check and the training stack failing the test where reached; returns its one
    line of error."""
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: pytest.fail("every image was decoded before the refusal"))
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded before the refusal"))

    def run(*args: str) -> str:
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    return run


def write_recipe(tmp_path, image_folder, method="lora", **sections) -> str:
    path = tmp_path / "recipe.yaml"
    data = {"resolution": 64, **({} if method == "dreambooth" else {"image_dir": str(image_folder)})}  # DreamBooth's concepts name theirs
    path.write_text(yaml.safe_dump({"method": method, "model": {"pretrained": str(SHIPPED_BASE)}, "output_dir": str(tmp_path / "run"),
                                    "data": data, "validation": {"prompts": []}, **sections}))  # fmt: skip
    return str(path)


def a_checkpoint(tmp_path, step: int, settings: dict, deepspeed: bool = False):
    """A checkpoint of the run in tmp_path/run, as its JSON and file names tell it (what the early checks read)."""
    folder = tmp_path / "run" / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if deepspeed:
        (folder / "pytorch_model").mkdir()  # ZeRO-2's files: the weights whole
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "processes": 1, "recipe": settings}))
    return folder


def test_a_resume_with_nothing_left_to_train_is_refused_before_the_data_check(image_folder, tmp_path, refused_first):
    recipe = write_recipe(tmp_path, image_folder, train={"max_steps": 4})
    checkpoint = a_checkpoint(tmp_path, 4, load_recipe(recipe, []).flat_settings())
    line = refused_first(recipe, "--resume", "latest")
    assert f"{checkpoint} is at step 4 and train.max_steps is 4: nothing left to train" in line, line


def test_a_resume_of_other_trained_weights_is_refused_before_the_data_check(image_folder, tmp_path, refused_first):
    recipe = write_recipe(tmp_path, image_folder, train={"max_steps": 4}, lora={"rank": 4})
    a_checkpoint(tmp_path, 2, {**load_recipe(recipe, []).flat_settings(), "lora.rank": 8})
    line = refused_first(recipe, "--resume", "latest")
    assert "trained other weights or optimizer groups than this recipe would (lora.rank 8 -> 4)" in line, line


def test_a_resume_of_a_deepspeed_checkpoint_without_deepspeed_is_refused_before_the_data_check(image_folder, tmp_path, refused_first):
    recipe = write_recipe(tmp_path, image_folder, train={"max_steps": 4})
    checkpoint = a_checkpoint(tmp_path, 2, load_recipe(recipe, []).flat_settings(), deepspeed=True)
    line = refused_first(recipe, "--resume", str(checkpoint))
    assert f"checkpoint {checkpoint} was written under DeepSpeed ZeRO-2 by 1 process, this run is without DeepSpeed" in line, line


def test_prodigy_without_its_package_is_refused_before_the_data_check(image_folder, tmp_path, refused_first, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # not found, as where it is not installed
    line = refused_first(write_recipe(tmp_path, image_folder, optimizer={"name": "prodigy", "lr": 1.0}))
    assert line == "error: optimizer.name prodigy needs the prodigyopt package: pip install prodigyopt", line


def test_an_8bit_optimizer_without_bitsandbytes_falls_back_said_before_the_data_check_and_once(image_folder, tmp_path, monkeypatch, capsys):
    """The fallback to AdamW was said as train() built the optimizer, once every image had been decoded; now before, and
    train()'s own word (for callers that skip the command) is not said again within the command."""
    import torch

    from finetune.errors import FinetuneError
    from finetune.optim.optimizers import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not found, as where it is not installed
    said: dict[str, str] = {}

    def data_check(recipe, resume_from=None):
        said["before the data check"] = capsys.readouterr().out

    def training(recipe, args, base_location):  # train() as far as its optimizer, within the command
        build_optimizer(recipe.optimizer, [torch.nn.Parameter(torch.zeros(2))])
        said["by train()"] = capsys.readouterr().out
        raise FinetuneError("stopped here by the test")

    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", data_check)
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", training)
    assert main(["train", write_recipe(tmp_path, image_folder, optimizer={"name": "adamw8bit"})]) == 2
    fallback = ("warning: optimizer.name=adamw8bit: bitsandbytes is not installed (pip install bitsandbytes for its 8-bit states); "
                "falling back to torch AdamW (32-bit states)")  # fmt: skip
    assert said["before the data check"].count(fallback) == 1, said
    assert "bitsandbytes" not in said["by train()"], said


def test_fp16_on_a_cpu_is_refused_before_the_data_check(image_folder, tmp_path, refused_first, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the run's device is the CPU, whatever GPU the machine has
    line = refused_first(write_recipe(tmp_path, image_folder, train={"mixed_precision": "fp16"}))
    assert line.startswith("error: train.mixed_precision fp16 needs a GPU") and line.endswith("on a CPU use bf16 or no"), line


def test_what_deepspeed_cannot_train_is_refused_before_the_data_check(image_folder, tmp_path, refused_first, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as `accelerate launch --use_deepspeed --deepspeed_config_file` sets it
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "configs" / "deepspeed" / "zero2.json"))
    line = refused_first(write_recipe(tmp_path, image_folder, lora={"train_text_encoder": True}))
    assert line.startswith("error: DeepSpeed trains one model per run, this recipe trains 2 (unet, text_encoder): set lora.train_text_encoder"), line


def test_a_resume_under_deepspeed_of_a_checkpoint_without_it_is_refused_before_the_data_check(image_folder, tmp_path, refused_first, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "configs" / "deepspeed" / "zero2.json"))
    recipe = write_recipe(tmp_path, image_folder, train={"max_steps": 4})
    checkpoint = a_checkpoint(tmp_path, 2, load_recipe(recipe, []).flat_settings())
    line = refused_first(recipe, "--resume", "latest")
    assert f"checkpoint {checkpoint} was written without DeepSpeed, this run is under DeepSpeed ZeRO-2 by 1 process" in line, line


@pytest.mark.parametrize("class_dir", ["instance_dir", "a file"])
def test_a_class_dir_that_cannot_hold_class_images_is_refused_before_the_data_check(class_dir, image_folder, tmp_path, refused_first):
    """An instance folder named as the class folder was decoded twice (as instances, then as the user's class images) before
    DreamBooth's check_data refused it; a file, once."""
    folder = image_folder if class_dir == "instance_dir" else next(image_folder.glob("*.png"))
    concept = {"instance_dir": str(image_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(folder)}
    recipe = write_recipe(tmp_path, image_folder, method="dreambooth", dreambooth={"concepts": [concept], "num_class_images": 4})
    line = refused_first(recipe)
    said = "is dreambooth.concepts.0.instance_dir: give class images a folder of their own" if class_dir == "instance_dir" else "is a file, not a folder"
    assert line.startswith(f"error: dreambooth.concepts.0.class_dir {folder} {said}"), line


def test_a_controlnet_trained_for_another_target_is_refused_before_the_data_check(tiny_model, pairs_folder, tmp_path, refused_first):
    """ControlNetMethod refused it once the base model had loaded; its run's record and the base's scheduler config say it."""
    from controlnet_helpers import write_controlnet_run

    run = write_controlnet_run(tiny_model, tmp_path / "v-edges", trained=False)
    (run / CONTROLNET_DIR / METADATA_FILE).write_text(json.dumps({"finetune.method": "controlnet", "finetune.prediction_type": "v_prediction"}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "controlnet", "model": {"pretrained": str(tiny_model)}, "output_dir": str(tmp_path / "run"),
                                      "data": {"image_dir": str(pairs_folder), "resolution": 64}, "validation": {"prompts": []},
                                      "controlnet": {"pretrained": str(run)}}))  # fmt: skip
    line = refused_first(str(recipe))
    assert line == f"error: controlnet.pretrained {run} was trained for v_prediction, this run trains for epsilon: set model.prediction_type: v_prediction", line
    with pytest.raises(pytest.fail.Exception, match="every image was decoded"):  # trained for this run's target: on to the data check
        refused_first(str(recipe), "model.prediction_type=v_prediction")


def test_a_perceptual_network_that_is_no_classifier_is_refused_before_the_data_check(image_folder, tmp_path, refused_first):
    """VAEMethod.check_data loads vae.perceptual_network (torch) before it reads the images; the command's data check ran
    before that. Its header says another model's weights, and a file that is no safetensors file, at once."""
    from safetensors.numpy import save_file

    lora, text = tmp_path / "lora.safetensors", tmp_path / "notes.safetensors"
    save_file({"unet.up.lora_A.weight": np.zeros((2, 2), np.float32)}, str(lora))
    text.write_text("not a safetensors file")
    for network, why in ((lora, "not a classifier's, e.g. unet.up.lora_A.weight"), (text, "")):
        line = refused_first(write_recipe(tmp_path, image_folder, method="vae", vae={"perceptual_weight": 0.1, "perceptual_network": str(network)}))
        assert line.startswith(f"error: vae.perceptual_network {network} is not a toy-world classifier file (") and line.endswith(
            f"{why}): train one with python -m finetune.toyworld.classifier"), line


@pytest.mark.parametrize(("recorded", "said"), [({"finetune.prediction_type": "v_prediction"}, "was trained for v_prediction, this run trains for epsilon: "
                                                 "set model.prediction_type: v_prediction"),
                                                ({"finetune.clip_skip": "2"}, "was trained with clip skip 2, this recipe's model.clip_skip is 1: set it to 2")])  # fmt: skip
def test_a_lora_init_from_trained_otherwise_is_refused_before_the_data_check(recorded, said, image_folder, tmp_path, refused_first):
    """The LoRA method refused it once the base had loaded and the file's tensors were read; its header says it."""
    from safetensors.numpy import save_file

    lora = tmp_path / "trained.safetensors"
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{layer}.lora_A.weight": np.zeros((4, 32), np.float32), f"{layer}.lora_B.weight": np.zeros((32, 4), np.float32)}, str(lora),
              metadata={"finetune.method": "lora", **recorded})  # fmt: skip
    line = refused_first(write_recipe(tmp_path, image_folder, lora={"init_from": str(lora)}))
    assert line == f"error: lora.init_from {lora} {said}", line


def test_the_default_run_makes_these_checks_without_torch(tmp_path):
    """Only a run whose answer needs torch imports it before the data check (mixed precision, DeepSpeed): a default recipe's
    checks and data check (which here refuses a corrupt image) leave the training stack unloaded."""
    from test_cli_startup import run_in_fresh_python

    folder = shutil.copytree(REPO / "datasets" / "star", tmp_path / "star")
    (folder / "zz_corrupt.png").write_bytes(b"garbage")
    (folder / "zz_corrupt.txt").write_text("a star")
    modules, errors = run_in_fresh_python([["train", "recipes/quickstart.yaml", f"output_dir={tmp_path / 'run'}", f"data.image_dir={folder}"]])
    assert "zz_corrupt.png cannot be read" in errors[0], errors
    assert "torch" not in modules and "accelerate" not in modules, modules


@pytest.mark.parametrize(("tensors", "said"), [
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 8}, "rank"),
    ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 4}, "lora.train_text_encoder"),
])  # fmt: skip
def test_a_lora_init_from_of_other_ranks_or_layers_is_refused_before_the_data_check(tensors, said, image_folder, tmp_path, refused_first):
    """Its ranks and layers against the recipe's: the LoRA method refused them as it read the file, after every image was decoded."""
    from safetensors.numpy import save_file

    lora = tmp_path / "other.safetensors"
    weights = {}
    for layer, rank in tensors.items():
        weights |= {f"{layer}.lora_A.weight": np.zeros((rank, 32), np.float32), f"{layer}.lora_B.weight": np.zeros((32, rank), np.float32)}
    save_file(weights, str(lora), metadata={"finetune.method": "lora"})
    line = refused_first(write_recipe(tmp_path, image_folder, lora={"init_from": str(lora)}))
    assert line.startswith(f"error: lora.init_from {lora}") and said in line, line


def test_a_deepspeed_launch_without_deepspeed_installed_is_refused_before_the_data_check(image_folder, tmp_path, refused_first, monkeypatch):
    """pyproject.toml installs DeepSpeed on Linux alone: a Mac launching accelerate_config.yaml got accelerate's ImportError
    traceback from `Accelerator()`, once every image had been decoded."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` of a DEEPSPEED config sets
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "configs" / "deepspeed" / "zero2.json"))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not found, as where it is not installed
    recipe = write_recipe(tmp_path, image_folder)
    launch_without = "or launch without DeepSpeed (accelerate launch --multi_gpu --num_processes N, or finetune train alone)"
    missing = "error: this launch runs under DeepSpeed (accelerate's distributed_type DEEPSPEED, as accelerate_config.yaml sets it), which is not installed: "
    assert refused_first(recipe) == missing + f'pip install "deepspeed>=0.16"; {launch_without}'
    monkeypatch.setattr(sys, "platform", "darwin")
    assert refused_first(recipe) == missing + f"DeepSpeed is installed with finetune on Linux only, not on macOS; {launch_without}"


def test_an_8bit_optimizer_with_a_bitsandbytes_that_fails_to_import_is_refused_before_the_data_check(image_folder, tmp_path, refused_first, monkeypatch):
    """A bitsandbytes build for another CUDA raised as it was imported: the run ended in diffusers' traceback (it imports
    bitsandbytes wherever it is installed) as the trainer loaded, once every image had been decoded. A stand-in package
    that raises as the broken one did."""
    stand_in = tmp_path / "site" / "bitsandbytes"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text('raise RuntimeError("CUDA Setup failed despite GPU being available.")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)  # (restored after the test)
    line = refused_first(write_recipe(tmp_path, image_folder, optimizer={"name": "adamw8bit"}))
    assert line == ("error: optimizer.name adamw8bit: bitsandbytes is installed but cannot be imported (RuntimeError: CUDA Setup failed despite GPU "
                    "being available.), and diffusers imports it wherever it is installed: reinstall it for this machine (pip install "
                    "--force-reinstall bitsandbytes), or uninstall it (pip uninstall bitsandbytes; 8-bit optimizers then fall back to torch AdamW)"), line


def test_an_8bit_optimizer_whose_bitsandbytes_has_no_native_library_falls_back_said_before_the_data_check(image_folder, tmp_path, monkeypatch, capsys):
    """bitsandbytes installed without its native library (a build never compiled, its .so files gone) imports and says
    nothing on the CPU: its 8-bit step ran in its slow pure-torch code (on a GPU it raised at the first step). Its own
    record of it (`cextension.lib`, its mock library) is read after the import the command makes anyway, and the run
    falls back to AdamW, said before the data check."""
    import torch
    from bitsandbytes import cextension

    from finetune.errors import FinetuneError
    from finetune.optim.optimizers import build_optimizer

    # What bitsandbytes sets where its library fails to load on the CPU (cextension.py, 0.50.2), its own words.
    monkeypatch.setattr(cextension, "lib", cextension.ErrorHandlerMockBNBNativeLibrary("XPU/CPU can run without native library."))
    said: dict[str, object] = {}

    def data_check(recipe, resume_from=None):
        said["before the data check"] = capsys.readouterr().out

    def training(recipe, args, base_location):  # train() as far as its optimizer, within the command
        said["built"] = type(build_optimizer(recipe.optimizer, [torch.nn.Parameter(torch.zeros(4096))]))
        said["by train()"] = capsys.readouterr().out
        raise FinetuneError("stopped here by the test")

    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", data_check)
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", training)
    assert main(["train", write_recipe(tmp_path, image_folder, optimizer={"name": "adamw8bit"})]) == 2
    before = said["before the data check"].splitlines()
    fallbacks = [line for line in before if line.startswith("warning: optimizer.name=adamw8bit: bitsandbytes has no native library for this machine")]
    assert len(fallbacks) == 1 and fallbacks[0].endswith("; falling back to torch AdamW (32-bit states)"), before
    assert f"{Path(cextension.__file__).parent}/libbitsandbytes_*" in fallbacks[0], fallbacks
    assert said["built"] is torch.optim.AdamW and "bitsandbytes" not in said["by train()"], said
