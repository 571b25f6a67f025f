"""A LoRA records its base as training was given it (finetune.base_model), often an absolute path. A project folder moved,
or copied to another machine with its base, made that path point nowhere: sample, eval and merge without --base find it
now by its trailing parts in the folders above the adapter, and say which they took; found nowhere, one line names --base."""

from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from finetune.cli.main import base_or_recorded
from finetune.errors import FinetuneError
from finetune.sampling.adapter_records import recorded_base, recorded_base_config

LORA_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"


def lora_recording(path, base: str, **more) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({LORA_KEY: np.zeros((4, 32), np.float32)}, str(path), {"format": "pt", "finetune.base_model": base, **more})
    return str(path)


@pytest.mark.parametrize("recorded, configs", [("/home/alice/proj/models/sd15", "/home/alice/proj/configs"),
                                               (r"C:\Users\alice\proj\models\sd15", r"C:\Users\alice\proj\configs")])  # a run on Windows
def test_a_base_moved_with_its_project_folder_is_found_by_its_trailing_parts(tmp_path, capsys, recorded, configs):
    project = tmp_path / "bob" / "proj"
    (project / "models" / "sd15").mkdir(parents=True)
    (project / "configs").mkdir()
    (tmp_path / "bob" / "sd15").mkdir()  # a shorter match, farther from the adapter's own: the longest tail wins
    lora = lora_recording(project / "outputs" / "lora" / "pytorch_lora_weights.safetensors", recorded, **{"finetune.base_config": configs})
    assert recorded_base(lora, None) == str(project / "models" / "sd15")
    assert recorded_base_config(lora, None) == str(project / "configs")
    args = SimpleNamespace(lora=lora, controlnet=None, base=None, base_config=None)
    assert base_or_recorded(args) == str(project / "models" / "sd15")
    assert capsys.readouterr().out == (f"base model: {project / 'models' / 'sd15'} with the configs {project / 'configs'} (recorded by the adapter's "
                                       f"training run as {recorded}, not there: found by its trailing parts above the adapter; --base picks another)\n")  # fmt: skip


def test_a_base_found_nowhere_is_one_line_naming_base(tmp_path):
    lora = lora_recording(tmp_path / "shared" / "lora.safetensors", "/home/alice/proj/models/sd15")
    with pytest.raises(FinetuneError, match=rf"^pass --base MODEL: {lora} records the base /home/alice/proj/models/sd15, which is not there from here$"):
        recorded_base(lora, None)
