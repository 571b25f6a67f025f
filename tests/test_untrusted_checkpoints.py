"""A base model downloaded as a .ckpt (a pickle) from a model site: its weights load, and nothing else in it is
unpickled. A file made to run code as it loads (here: to make a marker folder) runs nothing, and one holding a
training run's objects beside its weights (a Lightning callback) is one line that names the object and says to use
the model's .safetensors file, not "damaged: download it again", which would fetch the same file."""

import os

import pytest
import torch
from safetensors.torch import load_file
from test_single_file import sd15_shaped_pipeline

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models import load_parts
from finetune.single_file_export import export_checkpoint


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


def test_a_ckpt_that_would_run_code_runs_none_and_is_refused_in_one_line(weights_and_configs, tmp_path):
    weights, configs = weights_and_configs
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": weights, "callbacks": RunsCodeWhenUnpickled(marker)}, tmp_path / "model.ckpt")
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
