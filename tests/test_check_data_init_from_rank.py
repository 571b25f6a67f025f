"""check-data with lora.init_from says a LoRA rank other than the recipe's lora.rank, in the line training stops with
before its model loads (`lora_init.read_checked`): it said "ready to train" of it."""

from __future__ import annotations

import torch
from conftest import REPO, SHIPPED_BASE
from safetensors.torch import save_file

from finetune.cli import main


def test_check_data_says_the_rank_line_training_stops_with(tmp_path, capsys):
    lora = tmp_path / "rank4.safetensors"
    save_file({"unet.mid_block.attentions.0.proj_in.lora.down.weight": torch.zeros(4, 32),
               "unet.mid_block.attentions.0.proj_in.lora.up.weight": torch.zeros(32, 4)}, str(lora))  # fmt: skip
    recipe = [str(REPO / "recipes" / "quickstart.yaml"), f"data.image_dir={REPO / 'datasets' / 'star'}", f"model.pretrained={SHIPPED_BASE}",
              f"lora.init_from={lora}"]  # fmt: skip
    assert main(["check-data", *recipe, "lora.rank=4"]) == 0
    capsys.readouterr()
    assert main(["check-data", *recipe, "lora.rank=8"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"result: training would stop: lora.init_from {lora} has rank 4 at unet.mid_block.attentions.0.proj_in, this recipe's lora.rank is 8: "
        "set lora.rank: 4")  # fmt: skip
