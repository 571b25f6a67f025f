"""LoRA files that load nowhere, refused in one line by the loader every command shares (sample, merge, export, eval,
lora.init_from), before any model loads; and an export output it cannot write."""

import pytest
import torch
from safetensors.torch import save_file

from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora
from finetune.formats.lora_export import export_lora

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["lora_up.weight", "dora_scale"])
def test_nan_or_infinite_weights_are_refused_and_not_exported(tmp_path, bad, key):
    """A cut or diverged file's NaN was loaded as it was: sample drew black, merge wrote a NaN pipeline, export a NaN copy,
    and lora.init_from trained to the first save, which then blamed the learning rate."""
    tensors = {f"{Q}.lora_down.weight": torch.randn(4, 32), f"{Q}.lora_up.weight": torch.randn(32, 4), f"{Q}.alpha": torch.tensor(4.0),
               f"{Q}.dora_scale": torch.rand(32, 1) + 0.5}  # fmt: skip
    tensors[f"{Q}.{key}"][3] = bad
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    message = rf"^LoRA \S+bad.safetensors holds NaN or infinite values \({Q}.{key}\): a damaged file, or one saved from a run that diverged: use another$"
    with pytest.raises(FinetuneError, match=message):
        load_lora(tmp_path / "bad.safetensors")
    with pytest.raises(FinetuneError, match=message):
        export_lora(tmp_path / "bad.safetensors", tmp_path / "out", "diffusers")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_to_a_folder_named_like_a_file_is_one_line_and_keeps_it(tmp_path, overwrite):
    """With --overwrite it was an IsADirectoryError traceback from renaming the written file onto the folder."""
    save_file({f"{Q}.lora_down.weight": torch.randn(4, 32), f"{Q}.lora_up.weight": torch.randn(32, 4)}, str(tmp_path / "style.safetensors"))
    (tmp_path / "out.safetensors").mkdir()
    (tmp_path / "out.safetensors" / "mine.txt").write_text("mine")
    with pytest.raises(FinetuneError, match=r"^export output \S+out.safetensors is a folder: give a .safetensors file path, or a folder name without that ending$"):
        export_lora(tmp_path / "style.safetensors", tmp_path / "out.safetensors", "kohya", overwrite=overwrite)
    assert [p.name for p in (tmp_path / "out.safetensors").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "style.safetensors"]
