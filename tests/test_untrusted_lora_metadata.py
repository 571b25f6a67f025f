"""A LoRA from a model site steers sampling by its metadata: the token length its prompts are read in
(finetune.max_token_length, sd-scripts' ss_max_token_length) set how many chunks of 75 tokens every prompt is
encoded in, so a file recording 7,500,000 made `sample`, the demo and `merge`'s result encode each prompt in 100,000
chunks (the UNet attending to 7.7 million states) until memory ran out. Only the lengths training writes are read;
another is one line naming the file."""

import pytest
import torch
from conftest import SHIPPED_BASE
from safetensors.torch import save_file

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.sampling import adapters_max_token_length

LAYER = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # a layer of the shipped base (64 wide)


def kohya_lora(path, **metadata):
    tensors = {f"{LAYER}.lora_down.weight": torch.zeros(4, 64), f"{LAYER}.lora_up.weight": torch.zeros(64, 4), f"{LAYER}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_only_the_token_lengths_training_writes_are_read():
    assert adapters_max_token_length({"a": {"finetune.max_token_length": "150"}, "b": {}}) == 150
    assert adapters_max_token_length({"a": {}}) == 75
    with pytest.raises(FinetuneError, match=r"^b records a max_token_length of 7500000, which no training writes \(75, 150 or 225"):
        adapters_max_token_length({"a": {"finetune.max_token_length": "225"}, "b": {"finetune.max_token_length": "7500000"}})


@pytest.mark.parametrize("command", ["sample", "merge"])
def test_a_lora_recording_a_vast_token_length_is_one_line_before_any_prompt_is_encoded(tmp_path, capsys, command):
    lora = kohya_lora(tmp_path / "lora.safetensors", ss_max_token_length="7500000")
    args = ["--prompt", "a star", "--out", str(tmp_path / "out"), "--steps", "1"] if command == "sample" else [str(tmp_path / "merged")]
    assert main([command, "--base", str(SHIPPED_BASE), "--lora", str(lora), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {lora} records a max_token_length of 7500000, which no training writes"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()
