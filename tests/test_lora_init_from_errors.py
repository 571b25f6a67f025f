"""lora.init_from files that cannot start this run, each refused in one line that names the key and the file."""

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.formats.kohya import LoRA, LoRALayer, save_lora_file
from finetune.training import trainer
from finetune.training.trainer import train
from test_lora_training import lora_model

TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.mark.parametrize("layer, says", [
    (TO_K, r"its layer \S+attn2\.to_k is for a weight of shape \(\d+, 1024\), the base model's is \(\d+, \d+\)"),
    ("unet.down_blocks.7.attentions.0.transformer_blocks.0.attn2.to_k", r"its layer \S+down_blocks\.7\S+ is not in it \(a LoRA of another architecture\)"),
])  # fmt: skip
def test_a_lora_of_another_base_is_said_to_be_one(make_recipe, tiny_model, tmp_path, layer, says):
    """A LoRA of another base at the recipe's rank was told 'has rank 4 at ..., this recipe's lora.rank is 4: set lora.rank: 4';
    one of a layer the base lacks, 'LoRA layer ... is not in the base model' without the key or the file."""
    base, _ = lora_model(make_recipe())
    out = base.unet.get_submodule(TO_K.removeprefix("unet.")).weight.shape[0]
    save_lora_file(LoRA({layer: LoRALayer(torch.randn(4, 1024), torch.randn(out, 4), 4.0)}), tmp_path / "sd2.safetensors", "diffusers")
    with pytest.raises(FinetuneError, match=rf"^lora.init_from \S+sd2.safetensors does not fit this base model: {says}: start from a LoRA trained "
                                            r"on this base \(model.pretrained\), or set model.pretrained to its$"):  # fmt: skip
        lora_model(make_recipe(lora__init_from=str(tmp_path / "sd2.safetensors")))


def test_a_folder_holding_no_lora_is_said_to_be_what_it_is(make_recipe, tmp_path):
    """A run's checkpoints/ folder, or a checkpoint saved without its outputs, was 'lora.init_from ... not found' though it is there."""
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "trainable_0.safetensors").write_bytes(b"")  # resumable state, never the LoRA
    for folder, says in ((checkpoint.parent, rf"holds a run's checkpoints: pick a checkpoint \(checkpoint-N, of step N\), e\.g\. {checkpoint}, the latest"),
                         (checkpoint, r"holds no LoRA file: its run had checkpoint\.save_outputs: false")):  # fmt: skip
        with pytest.raises(FinetuneError, match=rf"^lora.init_from: (checkpoint )?{folder} {says}"):
            train(make_recipe(lora__init_from=str(folder)))


@pytest.mark.parametrize("conv_3x3, override, says", [(False, {"lora__rank": 8}, r"at \S+to_q, this recipe's lora.rank is 8: set lora.rank: 4"),
                                                       (True, {"lora__conv_rank": 2}, r"at the 3x3 conv layer \S+conv1, this recipe gives those rank 2: set lora.conv_rank: 4")])  # fmt: skip
def test_a_rank_to_change_is_said_before_the_model_loads(make_recipe, tmp_path, monkeypatch, conv_3x3, override, says):
    """The file says its ranks: they were compared with the recipe's only once the base model had loaded and the LoRA was attached."""
    key, down = ("unet.down_blocks.0.resnets.0.conv1", torch.randn(4, 32, 3, 3)) if conv_3x3 else (TO_K.replace("attn2.to_k", "attn1.to_q"), torch.randn(4, 32))
    save_lora_file(LoRA({key: LoRALayer(down, torch.randn(32, 4, *([1, 1] if conv_3x3 else [])), 4.0)}), tmp_path / "r4.safetensors", "kohya")
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FinetuneError, match=rf"^lora.init_from \S+r4.safetensors has rank 4 {says}$"):
        train(make_recipe(lora__init_from=str(tmp_path / "r4.safetensors"), lora__target_modules=["to_q", "conv1"], **override))


def test_a_lora_of_another_base_is_said_before_the_data_check(tiny_model, image_folder, tmp_path, capsys, monkeypatch):
    """A text-encoder LoRA of SD1.x's width (768) given to a run on another base, said from its header and the base's configs
    (finetune/formats/lora_base_fit.py) before `finetune train` decodes every image: it was said once the base had loaded."""
    import json

    import finetune.data_check.train_inputs
    from test_lora_base_fit import lora_file

    from finetune.cli.main import main

    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: pytest.fail("every image was decoded before the refusal"))
    te = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    lora = lora_file(tmp_path / "sd1-te.safetensors", {te: (768, 768)})  # peft's names, as ours
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": str(tiny_model)}, "data": {"image_dir": str(image_folder), "resolution": 64},
                                  "lora": {"init_from": str(lora), "rank": 4, "train_text_encoder": True}, "output_dir": str(tmp_path / "run"),
                                  "validation": {"prompts": []}}))  # fmt: skip
    width = json.loads((tiny_model / "text_encoder" / "config.json").read_text())["hidden_size"]
    said = (f"lora.init_from {lora} does not fit base model {tiny_model}: its layer {te}.lora_A reads text 768 wide, the base's "
            f"{tiny_model / 'text_encoder' / 'config.json'} has hidden_size {width} (SD1.x: 768, SD2.x: 1024, SDXL: 2048): the LoRA was trained on "
            "another base; start from a LoRA trained on this base (model.pretrained), or set model.pretrained to its")  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {said}"]
    monkeypatch.undo()  # check-data decodes every image: then says it too (it said "ready to train")
    assert main(["check-data", str(recipe)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"result: training would stop: {said}"
