"""A local base-model folder with a damaged or foreign part: one line naming the file, before any weight
loads (it was diffusers' or transformers' traceback as the part loaded, or at the first training step)."""

import json
import shutil

import pytest
import torch

from finetune.cli.main import main
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models.model_source import resolve_model_folder


def damage(folder, case):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if case == "truncated_weights":  # a copy or download cut short
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "empty_config":
        (folder / "unet" / "config.json").write_text("")
    elif case == "config_of_another_class":
        shutil.copy(folder / "vae" / "config.json", folder / "unet" / "config.json")
    elif case == "no_scheduler_config":
        (folder / "scheduler" / "scheduler_config.json").unlink()
    elif case == "no_tokenizer_files":
        for file in (folder / "tokenizer").iterdir():
            file.unlink()


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("truncated_weights", r"base model folder .*: unet/diffusion_pytorch_model.safetensors is damaged \(.*incomplete metadata.*\): copy it again$"),
        ("empty_config", r"base model folder .*: unet/config.json cannot be read \(JSONDecodeError; empty or cut short\?\): copy the whole pipeline folder again$"),
        ("config_of_another_class", r"unet/config.json describes AutoencoderKL, not UNet2DConditionModel: put the pipeline's own unet folder there"),
        ("no_scheduler_config", r"base model folder .* has no scheduler/scheduler_config.json: copy the whole pipeline folder again$"),
        ("no_tokenizer_files", r"tokenizer/ has no tokenizer.json \(nor vocab.json and merges.txt\): copy the whole pipeline folder again$"),
    ],
)
def test_a_damaged_part_is_one_line_naming_its_file(case, pattern, tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "base")
    damage(folder, case)
    with pytest.raises(FinetuneError, match=pattern):
        resolve_model_folder(ModelConfig(pretrained=str(folder)))


def test_training_on_a_damaged_base_stops_in_one_line_before_loading(tiny_model, image_folder, tmp_path, capsys):
    folder = shutil.copytree(tiny_model, tmp_path / "base")
    damage(folder, "truncated_weights")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": str(folder)}, "data": {"image_dir": str(image_folder), "resolution": 64},
                                  "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}}))  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unet/diffusion_pytorch_model.safetensors is damaged" in err[0], err


def test_the_tiny_and_the_shipped_base_pass_the_checks(tiny_model):
    from conftest import SHIPPED_BASE

    for folder in (tiny_model, SHIPPED_BASE):
        assert resolve_model_folder(ModelConfig(pretrained=str(folder))) == folder


def test_a_base_of_another_architecture_is_refused_before_loading(tiny_model, tmp_path):
    # An SDXL folder has every part an SD1.x one has (and text_encoder_2): it loaded, and the UNet's first
    # step stopped on its missing SDXL inputs ("argument of type 'NoneType' is not iterable").
    sdxl = shutil.copytree(tiny_model, tmp_path / "sdxl")
    shutil.copytree(sdxl / "text_encoder", sdxl / "text_encoder_2")
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(FinetuneError, match=r"sdxl holds a StableDiffusionXLPipeline \(a second text encoder, .*\): finetune trains SD1.x and SD2.x bases"):
        resolve_model_folder(ModelConfig(pretrained=str(sdxl)))
    # The UNet's config alone says so too (a folder without text_encoder_2 or model_index.json).
    shutil.rmtree(sdxl / "text_encoder_2")
    (sdxl / "model_index.json").unlink()
    config = json.loads((sdxl / "unet" / "config.json").read_text())
    (sdxl / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(FinetuneError, match=r"sdxl holds an SDXL pipeline"):
        resolve_model_folder(ModelConfig(pretrained=str(sdxl)))
    # An inpainting UNet takes the mask and the masked image beside the latents: 9 channels.
    inpainting = shutil.copytree(tiny_model, tmp_path / "inpainting")
    config = json.loads((inpainting / "unet" / "config.json").read_text())
    (inpainting / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    with pytest.raises(FinetuneError, match=r"inpainting has a UNet of 9 input channels \(an inpainting or upscaling model\)"):
        resolve_model_folder(ModelConfig(pretrained=str(inpainting)))


def test_a_single_file_base_that_is_damaged_or_sdxl_is_one_line_before_loading(tmp_path):
    import torch
    from safetensors.torch import save_file

    # diffusers said "Unable to load weights from checkpoint file for 'X' at 'X'." and the advice was to set the configs.
    for name, content in (("empty.safetensors", b""), ("page.safetensors", b"<html>not found</html>")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(FinetuneError, match=rf"^base model file .*{name} is damaged or not a safetensors file \(.*\): download it again, or check model.pretrained$"):
            resolve_model_folder(ModelConfig(pretrained=str(tmp_path / name)))
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(2, 2), "model.diffusion_model.out.2.bias": torch.zeros(2)},
              tmp_path / "sdxl.safetensors")  # fmt: skip
    with pytest.raises(FinetuneError, match=r"sdxl.safetensors is an SDXL checkpoint \(conditioner.embedders names\): .* set --base to one of those$"):
        resolve_model_folder(ModelConfig.from_option(str(tmp_path / "sdxl.safetensors")))


def test_a_ckpt_that_is_no_checkpoint_is_not_sent_looking_for_configs(tmp_path, tiny_model, capsys):
    (tmp_path / "model.ckpt").write_text("not a pickle")
    assert main(["sample", "--base", str(tmp_path / "model.ckpt"), "--base-config", str(tiny_model), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: base model file {tmp_path / 'model.ckpt'} cannot be read as a checkpoint (damaged, or not a model file): download it again"]


def test_a_missing_local_base_is_said_before_the_data_check(image_folder, tmp_path, capsys):
    # The data check decodes every image (minutes for a large set): a typo in model.pretrained was said after it.
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "0000.png").write_bytes(b"cut short")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": str(tmp_path / "nowhere")}, "data": {"image_dir": str(data), "resolution": 64},
                                  "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}}))  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: base model {tmp_path / 'nowhere'} not found: no such folder or file (check model.pretrained)"]


def test_a_missing_folder_under_a_local_folder_is_not_asked_of_the_hub(tmp_path, monkeypatch):
    """models/sd15 beside a models/ folder was looked up as a hub id (offline: 'not in the local Hugging Face cache')."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models").mkdir()
    with pytest.raises(FinetuneError) as refused:
        resolve_model_folder(ModelConfig(pretrained="models/sd15"))
    assert str(refused.value) == (f"base model models/sd15 not found: no such folder or file (check model.pretrained) (relative paths are read "
                                  f"from the current folder, {tmp_path}, whose folder models makes it a path into that folder, not a hub id)")  # fmt: skip


def test_a_single_file_bases_config_folder_not_there_is_said_before_anything_loads(tmp_path, monkeypatch):
    """model.single_file_config (a folder or hub id) not there was diffusers' error as the file loaded, after the data check;
    configs/sd15 beside a configs/ folder was asked of the hub."""
    from safetensors.torch import save_file

    from finetune.models.model_source import locate_base

    monkeypatch.chdir(tmp_path)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "configs").mkdir()
    for configs, where in (("configs/sd15", f"{tmp_path}, whose folder configs makes it a path into that folder, not a hub id"), ("./sd15", f"{tmp_path}")):
        with pytest.raises(FinetuneError) as refused:
            locate_base(ModelConfig(pretrained=str(tmp_path / "model.safetensors"), single_file_config=configs))
        assert str(refused.value) == (f"model.single_file_config {configs} not found: give the diffusers folder or hub id of the model "
                                      f"{tmp_path / 'model.safetensors'} was made from (relative paths are read from the current folder, {where})")  # fmt: skip


def test_an_sdxl_hub_id_is_refused_from_its_configs_before_its_weights_download(tiny_model, tmp_path, monkeypatch):
    # stabilityai/stable-diffusion-xl-base-1.0 as model.pretrained downloaded about 7 GB, then stopped at the first step.
    import huggingface_hub

    configs = tmp_path / "configs"
    for part in ("unet", "text_encoder", "text_encoder_2"):
        (configs / part).mkdir(parents=True)
    unet = json.loads((tiny_model / "unet" / "config.json").read_text())
    (configs / "unet" / "config.json").write_text(json.dumps({**unet, "addition_embed_type": "text_time"}))
    (configs / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    asked = []

    def snapshot_download(repo_id, allow_patterns=(), **kwargs):
        asked.append(allow_patterns)
        return str(configs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FinetuneError, match=r"^base model stabilityai/sdxl holds a StableDiffusionXLPipeline .*: finetune trains SD1.x and SD2.x bases"):
        resolve_model_folder(ModelConfig(pretrained="stabilityai/sdxl"))
    assert asked == [["model_index.json", "*/config.json", "scheduler/scheduler_config.json"]]  # no weights asked for


def test_a_variant_the_folder_was_not_saved_in_is_one_line(tiny_model):
    # It was transformers' traceback: "Error no file named model.fp16.safetensors, or pytorch_model.fp16.bin".
    with pytest.raises(FinetuneError, match=r"has no fp16 weights in unet \(model.variant: fp16\): remove model.variant \(a folder's weights are found as saved\)"):
        resolve_model_folder(ModelConfig(pretrained=str(tiny_model), variant="fp16"))


def test_a_text_encoder_config_without_model_type_still_loads(tiny_model, tmp_path):
    # transformers' CLIPTextModel reads such a config (older savers left model_type out): no reason to refuse it.
    folder = shutil.copytree(tiny_model, tmp_path / "base")
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    del config["model_type"]
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    assert resolve_model_folder(ModelConfig(pretrained=str(folder))) == folder
    from transformers import CLIPTextModel

    CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")


def fake_hub_cache(cache, repo_id, folder):
    """`folder` as huggingface_hub keeps a downloaded repo: found offline (HF_HUB_OFFLINE=1) as `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def hub_base_requests(tiny_model, tmp_path, monkeypatch) -> list[str]:
    """The tiny model as hub id someone/tiny, in a fake cache read offline. The list says, in order, what was asked of
    the hub ("configs", or "weights" for patterns that select weights) and when the data check began (`finetune train`'s,
    before torch loads: train()'s takes its result)."""
    import huggingface_hub
    import huggingface_hub.constants

    import finetune.data_check.train_inputs as train_inputs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path / "hub", "someone/tiny", tiny_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    events, download, check = [], huggingface_hub.snapshot_download, train_inputs.check_data_first

    def snapshot_download(repo_id, **kwargs):
        events.append("weights" if any("safetensors" in pattern for pattern in kwargs["allow_patterns"]) else "configs")
        return download(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(train_inputs, "check_data_first", lambda recipe, resume_from=None: events.append("data check") or check(recipe, resume_from))
    return events


def hub_recipe(tmp_path, image_dir, **train):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": "someone/tiny"}, "data": {"image_dir": str(image_dir), "resolution": 64},
                                  "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}, "train": train}))  # fmt: skip
    return recipe


def test_a_hub_base_downloads_no_weights_before_the_data_check(tiny_model, image_folder, tmp_path, monkeypatch, capsys):
    """The command's pre-check downloaded a hub id whole (gigabytes for SD1.5), then the data check refused an image:
    its configs alone (checked: SD1.x's or SD2.x's kind) are fetched before the data check, its weights as it loads."""
    events = hub_base_requests(tiny_model, tmp_path, monkeypatch)
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "0000.png").write_bytes(b"cut short")
    assert main(["train", str(hub_recipe(tmp_path, data))]) == 2
    assert capsys.readouterr().err.startswith(f"error: image {data / '0000.png'} cannot be read")
    assert events == ["configs", "data check"]


def test_a_hub_base_is_looked_up_once_per_training_run(tiny_model, image_folder, tmp_path, monkeypatch, capsys):
    """The command's check, train() and loading each looked the hub id up (offline a cache search, online a request
    to the hub each); so did the outputs' reload of the parts a bf16 run holds in bf16. Stopped once the base is loaded:
    its configs were fetched once, before the data check, and its weights once, after it."""
    from finetune.models.loading import at_source_precision, load_base_model
    import finetune.training.trainer as trainer

    events = hub_base_requests(tiny_model, tmp_path, monkeypatch)
    loaded = []

    def load_then_stop(*args, **kwargs):
        loaded.append(load_base_model(*args, **kwargs))
        at_source_precision(loaded[0], ["vae", "text_encoder"])  # held in bf16: read again at their own precision, as outputs are
        raise FinetuneError("loaded")

    monkeypatch.setattr(trainer, "load_base_model", load_then_stop)
    assert main(["train", str(hub_recipe(tmp_path, image_folder, mixed_precision="bf16"))]) == 2
    assert capsys.readouterr().err == "error: loaded\n"  # train() clears accelerate's bf16 settings
    assert loaded[0].vae.dtype == torch.bfloat16
    assert events == ["configs", "data check", "weights"]


@pytest.mark.parametrize("kept", [("model_index.json", "*/config.json"), ("model_index.json", "*/config.json", "unet/*", "vae/*")])
def test_an_offline_cache_holding_part_of_a_hub_base_is_one_line_naming_the_missing_file(kept, tiny_model, tmp_path, monkeypatch):
    """Offline, snapshot_download returned the cache's snapshot folder without looking for the weights asked for: a cache
    holding a hub base's configs alone (an offline run after `locate_base` fetched them) passed the weights step and was
    diffusers' traceback as the model loaded."""
    import huggingface_hub.constants

    from finetune.config import ModelConfig
    from finetune.models.model_source import locate_base, with_weights

    partial = tmp_path / "partial"
    for pattern in kept:
        for file in tiny_model.glob(pattern):
            (partial / file.relative_to(tiny_model)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, partial / file.relative_to(tiny_model))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path / "hub", "someone/tiny", partial)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    location = locate_base(ModelConfig.from_option("someone/tiny"))  # the configs are there
    missing = "text_encoder/model.safetensors" if "unet/*" in kept else "unet/diffusion_pytorch_model.safetensors"
    with pytest.raises(FinetuneError) as raised:
        with_weights(location)
    assert str(raised.value) == (f"base model someone/tiny is only partly in the local Hugging Face cache (no {missing}) and downloads are off "
                                 "(HF_HUB_OFFLINE=1): download the model once with network (run without HF_HUB_OFFLINE=1), or set --base "
                                 "to a local diffusers folder")  # fmt: skip


@pytest.mark.parametrize("name", ["Model.SAFETENSORS", "model.Ckpt"])
def test_a_single_file_base_with_its_suffix_in_capitals_is_read_as_its_suffix_says(name, tmp_path):
    # It was "not found: no such folder or file", of a file that is there; then told to be renamed. Read as what it is
    # now (it loads: tests/test_suffix_case.py), so a file that is no model is said as one in lowercase is.
    said = {}
    for named in (name, name.lower()):
        (tmp_path / named).write_bytes(b"weights")
        with pytest.raises(FinetuneError) as refused:
            resolve_model_folder(ModelConfig(pretrained=str(tmp_path / named)))
        said[named] = str(refused.value).replace(named, "NAME")
    assert said[name] == said[name.lower()] and "rename" not in said[name], said


def test_a_hub_setting_on_a_local_base_is_refused_not_left_unread(tiny_model, tmp_path):
    """model.revision on a local folder or file, and model.variant on one file, were left unread without a word."""
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    for pretrained, setting, said in (
        (str(tiny_model), {"revision": "v2"}, f"model.revision picks a hub id's branch, tag or commit, and base model {tiny_model} is a local folder: remove model.revision"),
        (str(tmp_path / "model.safetensors"), {"variant": "fp16"}, f"model.variant picks which weights files of a folder load (e.g. fp16), and base model "
                                                                   f"{tmp_path / 'model.safetensors'} is one file: remove model.variant"),
    ):  # fmt: skip
        with pytest.raises(FinetuneError) as refused:
            resolve_model_folder(ModelConfig(pretrained=pretrained, **setting))
        assert str(refused.value) == said


@pytest.mark.parametrize("name", ["model.pt", "diffusion_pytorch_model.bin"])
def test_a_base_file_of_another_kind_is_said_to_be_there(tmp_path, name):
    """A .pt or .bin given as the base was 'not found: no such folder or file', of a file that is there."""
    (tmp_path / name).write_bytes(b"weights")
    with pytest.raises(FinetuneError, match=rf"^base model {tmp_path / name} is a file finetune does not read as a base model: give a single "):
        resolve_model_folder(ModelConfig.from_option(str(tmp_path / name)))


def test_check_data_offline_says_a_hub_base_not_in_the_cache_as_training_would(tiny_model, image_folder, tmp_path, monkeypatch, capsys):
    """check-data left a hub id to training and said "ready to train" offline of a base the cache does not hold, where
    `finetune train` stops at once. Offline it looks the id up in the cache (downloading nothing), as training does."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    assert main(["check-data", str(hub_recipe(tmp_path, image_folder))]) == 1
    out = capsys.readouterr().out
    assert out.startswith("fatal: base model someone/tiny is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1): "
                          "download it once with network, or set model.pretrained to a local diffusers folder or .safetensors file"), out  # fmt: skip
    assert out.splitlines()[-1] == "result: training would stop: 1 fatal problem; fix it"
    fake_hub_cache(tmp_path / "hub", "someone/tiny", tiny_model)
    assert main(["check-data", str(hub_recipe(tmp_path, image_folder))]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("result: ready to train")


@pytest.mark.parametrize(("env", "said"), [({"TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE=yes"),
                                           ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "1"}, "TRANSFORMERS_OFFLINE=1"),
                                           ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, None), ({"HF_HUB_OFFLINE": "on"}, "HF_HUB_OFFLINE=on"),
                                           ({}, None)])  # fmt: skip
def test_downloads_are_off_exactly_where_huggingface_hub_is_offline(env, said, monkeypatch):
    """Only HF_HUB_OFFLINE was read: under TRANSFORMERS_OFFLINE=1 (which huggingface_hub takes too) a base or ControlNet not
    in the cache was said "the hub could not be reached", and check-data did not look in the cache. Asked of the installed
    huggingface_hub itself, which reads its variables as it is imported."""
    import subprocess
    import sys

    from finetune.models.model_source import downloads_off, hub_offline_by

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    hub = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"], capture_output=True, text=True, check=True)
    assert downloads_off() == (hub.stdout.strip() == "True"), (env, hub.stdout)
    assert hub_offline_by() == said


def test_check_data_says_a_base_not_in_the_cache_under_transformers_offline(tiny_model, image_folder, tmp_path, monkeypatch, capsys):
    """TRANSFORMERS_OFFLINE=1 alone keeps huggingface_hub offline: the base is looked up in the cache, and the variable named."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    assert main(["check-data", str(hub_recipe(tmp_path, image_folder))]) == 1
    assert capsys.readouterr().out.startswith("fatal: base model someone/tiny is not in the local Hugging Face cache and downloads are off "
                                              "(TRANSFORMERS_OFFLINE=1): download it once with network, or set model.pretrained to ")  # fmt: skip
