"""A single-file base (.safetensors) that cannot be read as given: one clean line, whatever diffusers says; and
the model: and train: settings its configs refuse, said before the data check as a folder base's are."""

import json
import logging.handlers
import shutil

import huggingface_hub.constants
import pytest
from test_base_model_errors import fake_hub_cache
from test_single_file import sd15_shaped_pipeline
from train_command_files import write_recipe

from finetune.cli.main import main
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.formats.single_file_export import export_checkpoint
from finetune.models.model_source import check_single_file_settings, locate_base
from finetune.models.single_file_configs import SD1_CONFIGS, SD2_CONFIGS


@pytest.fixture
def single_file(tmp_path):
    sd15_shaped_pipeline(tmp_path).save_pretrained(tmp_path / "configs")
    return export_checkpoint(tmp_path / "configs", tmp_path / "model.safetensors")[0]


def errors(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.strip() and not line.startswith("Loading")]  # progress bars


def test_a_single_file_base_that_cannot_load_is_one_whole_line(single_file, tmp_path, capfd, monkeypatch):
    from conftest import SHIPPED_BASE

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty one: no configs in it
    errors(capfd)
    # Configs of another architecture: diffusers' sentence whole (it was cut at 300 characters, mid-word), not its advice.
    assert main(["sample", "--base", str(single_file), "--base-config", str(SHIPPED_BASE), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = errors(capfd)
    assert len(err) == 1 and err[0].endswith("but got torch.Size([77, 32]). (give --base-config the diffusers folder or hub id of the model this file was made from)"), err
    # No configs, offline, none in the cache: diffusers' two lines ("local_files_only is True ... Attempting to download") no
    # longer come first, nor its loading: the line says so as the base is located (tests/test_single_file_offline.py).
    # (Its handler writes to the stderr of when diffusers was imported, which pytest may hold: its records are watched too.)
    logged = logging.handlers.BufferingHandler(100)
    logging.getLogger("diffusers.loaders.single_file").addHandler(logged)
    try:
        assert main(["sample", "--base", str(single_file), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    finally:
        logging.getLogger("diffusers.loaders.single_file").removeHandler(logged)
    err = errors(capfd)
    assert len(err) == 1 and err[0].startswith(f"error: base model file {single_file} is read with hub model {SD1_CONFIGS}'s configs"), err
    assert not [record.getMessage() for record in logged.buffer if "local_files_only" in record.getMessage()]


def configs_in_the_cache(tmp_path, monkeypatch) -> None:
    """SD1.5's configs as an SD1.x file without model.single_file_config is read with offline: from the hub cache (here
    the file's own, which a real SD1.5's match)."""
    fake_hub_cache(tmp_path / "hub", SD1_CONFIGS, tmp_path / "configs")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("with_configs", [True, False])
def test_clip_skip_and_zero_terminal_snr_a_single_file_refuses_are_said_as_it_is_located(single_file, tmp_path, with_configs, monkeypatch):
    """They were said once the file had loaded (after the data check): its configs folder says its text encoder's layers
    and its prediction, and without one the file's tensor names do (diffusers then reads an SD1.x file with SD1.5's configs)."""
    configs = {"single_file_config": str(tmp_path / "configs")} if with_configs else {}
    configs_in_the_cache(tmp_path, monkeypatch)
    layers = 2  # sd15_shaped_pipeline's text encoder
    with pytest.raises(FinetuneError, match=rf"^model.clip_skip {layers + 1}: this text encoder has {layers} layers; use 1 to {layers}$"):
        locate_base(ModelConfig(pretrained=str(single_file), clip_skip=layers + 1, **configs))
    assert locate_base(ModelConfig(pretrained=str(single_file), clip_skip=layers, **configs)).folder is None
    with pytest.raises(FinetuneError, match=rf"^model.zero_terminal_snr needs v-prediction .*, and base model {single_file} predicts epsilon"):
        locate_base(ModelConfig(pretrained=str(single_file), zero_terminal_snr=True, **configs))
    locate_base(ModelConfig(pretrained=str(single_file), zero_terminal_snr=True, prediction_type="v_prediction", **configs))


def test_an_sd2_files_text_encoder_counts_the_layers_diffusers_loads():
    """SD2's OpenCLIP has 24 resblocks and diffusers loads 23 (the last is left out: SD2 reads the penultimate layer)."""
    keys = [f"cond_stage_model.model.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(24)]
    with pytest.raises(FinetuneError, match=r"^model.clip_skip 24: this text encoder has 23 layers; use 1 to 23$"):
        check_single_file_settings(keys, ModelConfig(pretrained="sd2.safetensors", clip_skip=24))
    check_single_file_settings(keys, ModelConfig(pretrained="sd2.safetensors", clip_skip=23, zero_terminal_snr=True))  # its prediction: diffusers' guess


@pytest.mark.parametrize("with_configs", [True, False])
def test_a_timestep_range_a_single_file_lacks_is_said_before_the_data_check(single_file, image_folder, tmp_path, capsys, with_configs, monkeypatch):
    configs_in_the_cache(tmp_path, monkeypatch)
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "0000.png").write_bytes(b"cut short")  # the data check would stop at it
    model = {"pretrained": str(single_file), **({"single_file_config": str(tmp_path / "configs")} if with_configs else {})}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": model, "data": {"image_dir": str(data), "resolution": 64}, "train": {"max_timestep": 1200},
                                  "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}}))  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: train.max_timestep 1200 is beyond the base model's 1000 training timesteps: set at most 1000"]


def test_a_lora_init_from_for_another_target_than_a_single_files_is_said_before_the_data_check(single_file, image_folder, tmp_path, capsys, monkeypatch):
    """Without model.single_file_config, diffusers reads the file with its kind's hub configs (SD1.5's here, from the cache):
    their scheduler says the prediction type. The LoRA method said a LoRA trained for another one once the file had loaded,
    after every image was decoded."""
    import numpy as np
    from safetensors.numpy import save_file

    import finetune.cli.train_command
    import finetune.data_check.train_inputs

    configs_in_the_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: pytest.fail("every image was decoded before the refusal"))
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded before the refusal"))
    v_configs = shutil.copytree(tmp_path / "configs", tmp_path / "v-configs")  # a hub id's, given as model.single_file_config
    scheduler = json.loads((v_configs / "scheduler" / "scheduler_config.json").read_text())
    (v_configs / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}))
    fake_hub_cache(tmp_path / "hub", "someone/v-configs", v_configs)
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for recorded, configs, trained in (("v_prediction", {}, "epsilon"), ("epsilon", {"single_file_config": "someone/v-configs"}, "v_prediction")):
        lora = tmp_path / f"{recorded}.safetensors"
        save_file({f"{layer}.lora_A.weight": np.zeros((4, 32), np.float32), f"{layer}.lora_B.weight": np.zeros((32, 4), np.float32)}, str(lora),
                  metadata={"finetune.method": "lora", "finetune.prediction_type": recorded})  # fmt: skip
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(json.dumps({"model": {"pretrained": str(single_file), **configs}, "data": {"image_dir": str(image_folder), "resolution": 64},
                                      "lora": {"init_from": str(lora), "rank": 4}, "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}}))  # fmt: skip
        assert main(["train", str(recipe)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: lora.init_from {lora} was trained for {recorded}, this run trains for {trained}: set model.prediction_type: {recorded}"]


def test_a_single_file_whose_yaml_says_another_prediction_than_its_hub_configs_is_said_before_the_data_check(single_file, image_folder, tmp_path, capsys, monkeypatch):
    """A v-prediction SD1.x file (its .yaml beside it says parameterization "v", as the webui reads it) is read by diffusers
    with SD1.5's configs, of epsilon: the run trained it for epsilon without a word (an SD2.x 512 base of epsilon, the other
    way round). model.prediction_type decides it."""
    import finetune.cli.train_command
    import finetune.data_check.train_inputs

    configs_in_the_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: pytest.fail("every image was decoded before the refusal"))
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded before the refusal"))
    single_file.with_suffix(".yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n")
    recipe = write_recipe(tmp_path, "lora", image_folder, single_file)
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: base model file {single_file} predicts v_prediction by model.yaml beside it, and diffusers reads it with hub model {SD1_CONFIGS}'s "
        "configs, which predict epsilon: set model.prediction_type: v_prediction, or model.single_file_config to a diffusers folder of the model it was made from"]
    with pytest.raises(pytest.fail.Exception, match="every image was decoded"):  # decided: on to the data check
        main(["train", str(recipe), "model.prediction_type=v_prediction"])


def test_train_itself_refuses_a_single_file_whose_yaml_says_another_prediction(single_file, make_recipe, tmp_path, monkeypatch):
    """finetune/cli/run_refusals.py makes train()'s refusals again before the data check; this one was the command's alone:
    train() called directly (the benchmark, a notebook) trained the v-prediction file for epsilon without a word."""
    import finetune.training.trainer as trainer

    configs_in_the_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(trainer, "load_base_model", lambda *args: pytest.fail("the base was loaded before the refusal"))
    single_file.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    with pytest.raises(FinetuneError) as refused:
        trainer.train(make_recipe(model__pretrained=str(single_file)))
    assert str(refused.value).startswith(f"base model file {single_file} predicts v_prediction by model.yaml beside it, and diffusers reads it "
                                         f"with hub model {SD1_CONFIGS}'s configs, which predict epsilon: set model.prediction_type: v_prediction")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_ckpt_whose_yaml_says_another_prediction_than_its_hub_configs_is_said_before_the_data_check(legacy, single_file, image_folder, tmp_path,
                                                                                                     capsys, monkeypatch):  # fmt: skip
    """As of a .safetensors file (above): a .ckpt's kind is its tensors' (its pickle's shapes), or where they are not read
    before it loads (torch's legacy format), its .yaml's UNet width (SD1.x's 768, SD2.x's 1024), as diffusers picks the hub
    configs by those tensors. It was checked for .safetensors files alone: the v-prediction SD1.x .ckpt trained for epsilon,
    the SD2.x 512 base's for v, without a word."""
    import torch
    from safetensors.torch import load_file

    import finetune.data_check.train_inputs

    configs_in_the_cache(tmp_path, monkeypatch)  # SD1.5's; SD2's not in it: diffusers' pick predicts v (HUB_PREDICTION_TYPES)
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: pytest.fail("every image was decoded before the refusal"))
    ckpt = tmp_path / "model.ckpt"
    torch.save(load_file(single_file), ckpt, _use_new_zipfile_serialization=not legacy)  # an SD1.x-shaped file's tensors
    # The legacy file's .yaml says SD2.x's width and names no parameterization (SD2's 512 base: epsilon); the other's, "v".
    yaml = "    unet_config:\n      params:\n        context_dim: 1024\n" if legacy else '    parameterization: "v"\n'
    ckpt.with_suffix(".yaml").write_text(f"model:\n  params:\n{yaml}")
    said, configs, loads_as = ("epsilon", SD2_CONFIGS, "v_prediction") if legacy else ("v_prediction", SD1_CONFIGS, "epsilon")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": str(ckpt)}, "data": {"image_dir": str(image_folder), "resolution": 64},
                                  "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}}))  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: base model file {ckpt} predicts {said} by model.yaml beside it, and diffusers reads it with hub model {configs}'s "
        f"configs, which predict {loads_as}: set model.prediction_type: {said}, or model.single_file_config to a diffusers folder of the model "
        "it was made from"]  # fmt: skip


def test_a_lora_init_from_for_another_target_than_a_ckpts_is_said_before_the_data_check(single_file, image_folder, tmp_path, capsys, monkeypatch):
    """As of a .safetensors file (above): a .ckpt's kind, and so the prediction type of the hub configs it is read with, is
    known from its pickle's shapes before it loads; it was not, and the LoRA method said it after every image was decoded."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    import finetune.data_check.train_inputs

    configs_in_the_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: pytest.fail("every image was decoded before the refusal"))
    ckpt = tmp_path / "model.ckpt"
    torch.save(load_file(single_file), ckpt)
    layer, lora = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", tmp_path / "v.safetensors"
    save_file({f"{layer}.lora_A.weight": np.zeros((4, 32), np.float32), f"{layer}.lora_B.weight": np.zeros((32, 4), np.float32)}, str(lora),
              metadata={"finetune.method": "lora", "finetune.prediction_type": "v_prediction"})  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": str(ckpt)}, "data": {"image_dir": str(image_folder), "resolution": 64},
                                  "lora": {"init_from": str(lora), "rank": 4}, "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}}))  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: lora.init_from {lora} was trained for v_prediction, this run trains for epsilon: set model.prediction_type: v_prediction"]
