"""`finetune train` draws no transformers bar for loading or writing the text encoder: every process of a
launch drew 'Loading weights' at once (two bars on one line), and a save mid-run drew 'Writing model
shards' into the training bar's line (with a cursor-up escape). Nor do sample and merge, whose lines the README
quotes, nor export-base (diffusers' bar loading a pipeline). The hub's download bars stay."""

import yaml
from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging as transformers_logging

from finetune.cli.main import main


def test_train_draws_no_bar_for_the_text_encoders_weights(make_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transformers_logging, "_tqdm_active", transformers_logging.is_progress_bar_enabled())  # given back after
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train__max_steps=1).model_dump(mode="json")))
    assert not are_progress_bars_disabled()
    assert main(["train", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "training: 100%" in err  # the run's own bar
    assert "Loading weights" not in err and not transformers_logging.is_progress_bar_enabled()
    assert not are_progress_bars_disabled()  # downloads of a hub model still show theirs


def test_sample_merge_and_make_tiny_model_draw_no_bar_for_the_text_encoders_weights(tiny_model, tmp_path, monkeypatch, capsys):
    # The quickstart's last lines, as the README quotes them, had 'Loading weights: 100%|...' between the run's
    # 'output:' and sample's 'sampling on cpu in fp32'; merge and make-tiny-model drew 'Writing model shards'.
    monkeypatch.setattr(transformers_logging, "_tqdm_active", transformers_logging.is_progress_bar_enabled())  # given back after
    lora = lora_file(tiny_model, tmp_path / "lora")
    commands = (["sample", "--base", str(tiny_model), "--prompt", "x", "--steps", "1", "--num-images", "1", "--out", str(tmp_path / "s")],
                ["merge", "--base", str(tiny_model), "--lora", str(lora), str(tmp_path / "merged")],
                ["make-tiny-model", str(tmp_path / "tiny")])  # fmt: skip
    for command in commands:
        transformers_logging.enable_progress_bar()  # as each command finds them in a process of its own
        capsys.readouterr()
        assert main(command) == 0
        err = capsys.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err, (command[0], err)
        assert not are_progress_bars_disabled()  # downloads of a hub model still show theirs


def test_export_base_draws_no_bar_for_loading_the_pipeline(tiny_model, tmp_path, monkeypatch, capsys):
    # diffusers' 'Loading pipeline components...' bar came before its one line: export-base alone loads a whole
    # pipeline with from_pretrained, and transformers' switch does not quiet diffusers' bars.
    from diffusers.utils import logging as diffusers_logging

    monkeypatch.setattr(diffusers_logging, "_tqdm_active", True)  # as in a process of its own; given back after
    assert main(["export-base", str(tiny_model), str(tmp_path / "copy")]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {tmp_path / 'copy'}\n" and "Loading pipeline components" not in captured.err, captured.err
    assert not are_progress_bars_disabled()  # downloads of a hub model still show theirs


def lora_file(tiny_model, folder):
    """An untrained LoRA of the tiny model's UNet (its up weights zero): what merge needs, without training one."""
    import torch
    from diffusers import UNet2DConditionModel

    from finetune.config import LoRAConfig
    from finetune.methods.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    add_lora(unet, ["to_q"], torch.float32, LoRAConfig(rank=2, alpha=2))
    path = folder / "pytorch_lora_weights.safetensors"
    save_lora({"unet": unet}, path, {"finetune.base_model": str(tiny_model), "finetune.method": "lora"})
    return path
