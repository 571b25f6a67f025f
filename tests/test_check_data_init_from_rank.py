"""check-data with lora.init_from says a LoRA rank other than the recipe's lora.rank, in the line training stops with
before its model loads (`lora_init.read_checked`): it said "ready to train" of it."""

from __future__ import annotations

import json

import torch
from conftest import REPO, SHIPPED_BASE
from safetensors.torch import save_file

from finetune.cli.main import main


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


def test_check_data_says_the_layers_a_recipe_leaves_out_as_training_does_before_its_model_loads(tmp_path, capsys):
    """A kohya-trained LoRA of layers the recipe does not adapt (sd-scripts' text encoder, its MLP included; UNet layers
    outside lora.target_modules) was "ready to train" to check-data, and the run refused it only once its base had loaded."""
    width = json.loads((SHIPPED_BASE / "text_encoder" / "config.json").read_text())["hidden_size"]  # as wide as the base reads text (else: of another base)

    def lora_file(name: str, layers: list[str]):
        tensors = {}
        for layer in layers:
            tensors[f"{layer}.lora.down.weight"], tensors[f"{layer}.lora.up.weight"] = torch.zeros(16, width), torch.zeros(width, 16)
        save_file(tensors, str(tmp_path / name))
        return tmp_path / name

    unet, text = "unet.mid_block.attentions.0.proj_in", "text_encoder.text_model.encoder.layers.0"
    named = "text_encoder.encoder.layers.0"  # as the loader names a layer of transformers' CLIP text model
    recipe = [str(REPO / "recipes" / "quickstart.yaml"), f"data.image_dir={REPO / 'datasets' / 'star'}", f"model.pretrained={SHIPPED_BASE}"]
    with_text_encoder = ["lora.train_text_encoder=true", "train.cache_text_embeddings=false"]
    attention, mlp = lora_file("attention.safetensors", [unet, f"{text}.self_attn.q_proj"]), lora_file("mlp.safetensors", [unet, f"{text}.mlp.fc1"])
    for lora, overrides, said in (
        (attention, [], f"lora.init_from {attention} has text-encoder layers: set lora.train_text_encoder: true to start from them too"),
        (mlp, with_text_encoder, f"lora.init_from {mlp} adapts text-encoder layers (fc1; e.g. {named}.mlp.fc1) that this recipe's text-encoder "
                                 "LoRA leaves out: add fc1 to lora.text_encoder_target_modules"),
        (mlp, [], f"lora.init_from {mlp} adapts text-encoder layers (fc1; e.g. {named}.mlp.fc1) that this recipe's text-encoder "
                  "LoRA leaves out: add fc1 to lora.text_encoder_target_modules, and set lora.train_text_encoder: true"),
        (attention, [*with_text_encoder, "lora.target_modules=[to_q]"],
         f"lora.init_from {attention} adapts 1 layer this recipe's LoRA leaves out (e.g. {unet}): add proj_in to lora.target_modules"),
    ):  # fmt: skip
        assert main(["check-data", *recipe, f"lora.init_from={lora}", *overrides]) == 1
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"result: training would stop: {said}"
    assert main(["check-data", *recipe, f"lora.init_from={attention}", *with_text_encoder]) == 0
    assert main(["check-data", *recipe, f"lora.init_from={mlp}", *with_text_encoder, "lora.text_encoder_target_modules=[q_proj,fc1]"]) == 0
    capsys.readouterr()
    assert main(["train", *recipe, f"lora.init_from={mlp}", f"output_dir={tmp_path / 'run'}"]) != 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (f"error: lora.init_from {mlp} adapts text-encoder layers (fc1; e.g. {named}.mlp.fc1) that this recipe's "
                                            "text-encoder LoRA leaves out: add fc1 to lora.text_encoder_target_modules, and set lora.train_text_encoder: true")
    assert "training size" not in out  # said before the data check's summary, as the rank is
