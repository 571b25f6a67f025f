"""A base model downloaded as a .ckpt (a pickle) from a model site, or as a diffusers folder of .bin weights: its
weights load, and nothing else in it is unpickled. A file made to run code as it loads (here: to make a marker
folder) runs nothing, and one holding a training run's objects beside its weights (a Lightning callback) is one
line that names the object and says to use the model's .safetensors file, said as the base is located (before the
data check) from the pickle's names alone; it was "damaged: download it again" (which fetches the same file) for a
.ckpt, and transformers' or diffusers' traceback for a folder, as the model loaded."""

import os
import shutil

import pytest
import torch
from conftest import SHIPPED_BASE
from safetensors.torch import load_file, save_file
from test_single_file import sd15_shaped_pipeline

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.formats.single_file_export import export_checkpoint
from finetune.models.loading import load_parts
from finetune.models.model_source import locate_base


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # what a malicious pickle does: call anything as it loads (here, harmlessly, make a folder)
        return (os.makedirs, (self.marker,))


class TrainingCallback:  # a Lightning ModelCheckpoint, as many older .ckpt files hold one beside state_dict
    best_score = 0.5


@pytest.fixture(scope="module")
def weights_and_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    sd15_shaped_pipeline(folder).save_pretrained(folder / "configs")
    path, _ = export_checkpoint(folder / "configs", folder / "model.safetensors")
    return load_file(str(path)), folder / "configs"


def base(path, configs) -> ModelConfig:
    return ModelConfig(pretrained=str(path), single_file_config=str(configs))


def test_a_ckpt_of_weights_alone_loads(weights_and_configs, tmp_path):
    weights, configs = weights_and_configs
    torch.save({"state_dict": weights, "global_step": 1000}, tmp_path / "model.ckpt")
    unet = load_parts(base(tmp_path / "model.ckpt", configs), ["unet"])["unet"]
    name = "conv_in.weight"
    assert torch.equal(unet.state_dict()[name], weights["model.diffusion_model.input_blocks.0.0.weight"])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_a_ckpt_that_would_run_code_runs_none_and_is_refused_in_one_line(weights_and_configs, tmp_path, legacy):
    """Refused as the base is located; a file of torch's legacy format, whose names are not looked into, as it loads."""
    weights, configs = weights_and_configs
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": weights, "callbacks": RunsCodeWhenUnpickled(marker)}, tmp_path / "model.ckpt", _use_new_zipfile_serialization=not legacy)
    if not legacy:
        with pytest.raises(FinetuneError, match="holds objects besides its weights"):
            locate_base(base(tmp_path / "model.ckpt", configs))
    with pytest.raises(FinetuneError) as raised:
        load_parts(base(tmp_path / "model.ckpt", configs), ["unet"])
    assert not marker.exists()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"base model file {tmp_path / 'model.ckpt'} holds objects besides its weights (")
    assert "makedirs" in message and "weights_only=True" in message and message.endswith("use the model's .safetensors file, or convert this one on a machine where you trust it")


def test_a_ckpt_holding_a_training_runs_objects_names_them_rather_than_a_damaged_download(weights_and_configs, tmp_path):
    weights, configs = weights_and_configs
    torch.save({"state_dict": weights, "callbacks": {"ModelCheckpoint": TrainingCallback()}}, tmp_path / "model.ckpt")
    with pytest.raises(FinetuneError, match=r"holds objects besides its weights \(test_untrusted_checkpoints\.TrainingCallback\)") as raised:
        load_parts(base(tmp_path / "model.ckpt", configs), ["unet"])
    assert "download it again" not in str(raised.value)


def test_a_ckpt_pickled_with_protocol_4_is_refused_as_such_not_as_damaged(weights_and_configs, tmp_path):
    """torch's weights-only unpickler reads no protocol 4 (FRAME): the file is whole, and another download is the same file."""
    weights, configs = weights_and_configs
    torch.save({"state_dict": weights}, tmp_path / "model.ckpt", pickle_protocol=4)
    for load in (locate_base, lambda config: load_parts(config, ["unet"])):  # as the base is located, and as it loads
        with pytest.raises(FinetuneError) as raised:
            load(base(tmp_path / "model.ckpt", configs))
        assert str(raised.value).startswith(f"base model file {tmp_path / 'model.ckpt'} is pickled with protocol 4, which torch.load(weights_only=True) cannot read")


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_a_base_folder_whose_pickle_weights_would_run_code_is_refused_as_it_is_located(tmp_path, part):
    folder = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, folder)
    stem, pickle_name = ("model", "pytorch_model.bin") if part == "text_encoder" else ("diffusion_pytorch_model", "diffusion_pytorch_model.bin")
    weights = load_file(str(folder / part / f"{stem}.safetensors"))
    (folder / part / f"{stem}.safetensors").unlink()
    torch.save(weights, folder / part / pickle_name)  # tensors alone: loads, as diffusers and transformers read it
    assert torch.equal(load_parts(ModelConfig(pretrained=str(folder)), [part])[part].state_dict()[next(iter(weights))], next(iter(weights.values())))
    marker = tmp_path / "code-ran"
    torch.save({**weights, "extra": RunsCodeWhenUnpickled(marker)}, folder / part / pickle_name)
    with pytest.raises(FinetuneError) as raised:
        locate_base(ModelConfig(pretrained=str(folder)))
    assert not marker.exists()
    assert str(raised.value).startswith(f"base model folder {folder}: {part}/{pickle_name} holds objects besides its weights (")
    assert "makedirs" in str(raised.value) and str(raised.value).endswith("use the model's .safetensors weights, or convert this one on a machine where you trust it")
    torch.save(weights, folder / part / pickle_name, pickle_protocol=4)  # no objects: transformers' or diffusers' traceback as it loaded
    with pytest.raises(FinetuneError, match=rf"^base model folder {folder}: {part}/{pickle_name} is pickled with protocol 4, which torch.load"):
        locate_base(ModelConfig(pretrained=str(folder)))
    save_file(weights, str(folder / part / f"{stem}.safetensors"))  # beside safetensors weights, a pickle is not read
    assert locate_base(ModelConfig(pretrained=str(folder))).folder == folder
    assert not marker.exists()


def test_a_controlnet_folder_whose_pickle_weights_would_run_code_is_refused_before_it_loads(tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from finetune.controlnet.folder import resolve_controlnet_folder

    folder = tmp_path / "controlnet"
    ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(SHIPPED_BASE, subfolder="unet")).save_pretrained(folder, safe_serialization=False)
    assert resolve_controlnet_folder(str(folder)) == folder  # tensors alone: diffusers loads them with weights_only=True
    marker = tmp_path / "code-ran"
    weights = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    torch.save({**weights, "extra": RunsCodeWhenUnpickled(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FinetuneError) as raised:
        resolve_controlnet_folder(str(folder))
    assert not marker.exists()
    assert str(raised.value).startswith(f"--controlnet {folder}: diffusion_pytorch_model.bin holds objects besides its weights (")
