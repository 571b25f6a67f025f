"""The demo's base as one file, as `finetune sample --base` takes it: a .ckpt of weights alone loads (read with
torch.load(weights_only=True)) and renders what its diffusers folder renders; one holding other objects is the
one line `sample` says, nothing in it run. The demo refused every .ckpt as "a pickle checkpoint"."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_single_file import sd15_shaped_pipeline
from test_untrusted_checkpoints import RunsCodeWhenUnpickled

from finetune.demo.engine import DemoEngine, Request
from finetune.errors import FinetuneError
from finetune.formats.single_file_export import export_checkpoint


@pytest.fixture(scope="module")
def configs_and_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt-base")
    sd15_shaped_pipeline(folder).save_pretrained(folder / "configs")
    path, _ = export_checkpoint(folder / "configs", folder / "model.safetensors")
    return folder / "configs", load_file(str(path))


def test_a_ckpt_base_of_weights_alone_renders_as_its_folder(configs_and_weights, tmp_path):
    configs, weights = configs_and_weights
    torch.save({"state_dict": weights, "global_step": 1000}, tmp_path / "model.ckpt")
    request = Request(prompt="a red star", steps=2)
    from_file = DemoEngine(str(tmp_path / "model.ckpt"), tmp_path / "adapters", base_config=str(configs)).render(request)[0][0][0]
    from_folder = DemoEngine(str(configs), tmp_path / "adapters").render(request)[0][0][0]
    assert np.abs(np.asarray(from_file, dtype=float) - np.asarray(from_folder, dtype=float)).max() <= 2


def test_a_ckpt_base_holding_objects_is_refused_in_sample_s_line_and_runs_nothing(configs_and_weights, tmp_path):
    configs, weights = configs_and_weights
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": weights, "callbacks": RunsCodeWhenUnpickled(marker)}, tmp_path / "model.ckpt")
    with pytest.raises(FinetuneError) as raised:
        DemoEngine(str(tmp_path / "model.ckpt"), tmp_path / "adapters", base_config=str(configs))
    assert not marker.exists()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"base model file {tmp_path / 'model.ckpt'} holds objects besides its weights (")


def test_other_pickle_files_are_no_base(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(FinetuneError, match=r"model\.pt is a \.pt pickle file: give a diffusers folder, or a single \.safetensors or \.ckpt file"):
        DemoEngine(str(tmp_path / "model.pt"), tmp_path)
