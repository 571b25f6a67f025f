"""A single-file base offline (HF_HUB_OFFLINE=1) without model.single_file_config: diffusers reads it with a hub model's
configs (SD1.5's for an SD1.x file), from the local Hugging Face cache. Not there was huggingface_hub's error once the
base loaded, after the data check; it is one line as the base is located, in every command that takes such a base.
There, the file loads from them."""

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file
from test_base_model_errors import fake_hub_cache
from test_single_file import sd15_shaped_pipeline

from finetune.cli.main import main
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.formats.single_file_export import export_checkpoint
from finetune.models.model_source import locate_base
from finetune.models.single_file_configs import SD1_CONFIGS, SD2_CONFIGS, hub_configs_for


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Downloads off, and a hub cache of this test's own (empty until a test fills it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def single_file(tmp_path):
    sd15_shaped_pipeline(tmp_path).save_pretrained(tmp_path / "configs")
    return export_checkpoint(tmp_path / "configs", tmp_path / "model.safetensors")[0]


def configs_alone(folder, out):
    """`folder`'s configs and tokenizer, none of its weights: what diffusers' single-file loader fetches of a hub model."""
    return shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors"))


def recipe_file(tmp_path, base, image_dir, **model):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": str(base), **model}, "data": {"image_dir": str(image_dir), "resolution": 64},
                                  "output_dir": str(tmp_path / "run"), "validation": {"prompts": []},
                                  "train": {"max_steps": 1, "batch_size": 1}}))  # fmt: skip
    return recipe


def test_configs_not_in_the_cache_are_one_line_before_the_data_check_in_every_command(single_file, image_folder, tmp_path, offline, capsys):
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "0000.png").write_bytes(b"cut short")  # the data check would stop at it
    said = (f"base model file {single_file} is read with hub model {SD1_CONFIGS}'s configs (diffusers' pick for its kind), which the local "
            "Hugging Face cache does not hold, and downloads are off (HF_HUB_OFFLINE=1): set {key} to a local diffusers folder of the model "
            "the file was made from, or run once with network so the cache holds them")  # fmt: skip
    assert main(["train", str(recipe_file(tmp_path, single_file, data))]) == 2
    assert capsys.readouterr().err == f"error: {said.format(key='model.single_file_config')}\n"
    assert main(["check-data", str(recipe_file(tmp_path, single_file, image_folder))]) == 1
    assert f"fatal: {said.format(key='model.single_file_config')}\n" in capsys.readouterr().out
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}, str(lora))  # fmt: skip
    for argv in (["sample", "--prompt", "a red circle", "--out", str(tmp_path / "s")], ["merge", "--lora", str(lora), str(tmp_path / "merged")],
                 ["eval", "--out", str(tmp_path / "e")]):  # fmt: skip
        assert main([argv[0], "--base", str(single_file), *argv[1:]]) == 2, argv
        assert capsys.readouterr().err == f"error: {said.format(key='--base-config')}\n", argv
    from finetune.demo.engine import DemoEngine

    with pytest.raises(FinetuneError, match="^" + said.format(key="--base-config").replace("(", r"\(").replace(")", r"\)") + "$"):
        DemoEngine(str(single_file), tmp_path / "adapters")


def test_configs_the_cache_holds_load_the_file_offline_with_no_configs_given(single_file, image_folder, tmp_path, offline, capsys):
    """The cache holding the configs alone (a run online once fetched them), the run trains; part of them is one line."""
    fake_hub_cache(offline, SD1_CONFIGS, configs_alone(tmp_path / "configs", tmp_path / "fetched"))
    assert main(["train", str(recipe_file(tmp_path, single_file, image_folder))]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["sample", "--base", str(single_file), "--prompt", "a", "--num-images", "1", "--steps", "1", "--out", str(tmp_path / "s")]) == 0

    (offline / f"models--{SD1_CONFIGS.replace('/', '--')}" / "snapshots" / ("0" * 40) / "unet" / "config.json").unlink()
    with pytest.raises(FinetuneError, match=r"'s configs \(diffusers' pick for its kind\), of which the local Hugging Face cache lacks unet/config.json, "):
        locate_base(ModelConfig(pretrained=str(single_file)))


def test_a_hub_id_given_as_the_configs_is_looked_for_in_the_cache(single_file, tmp_path, offline, monkeypatch):
    with pytest.raises(FinetuneError, match=rf"^base model file {single_file} is read with hub model someone/configs's configs "
                                            r"\(model.single_file_config\), which the local Hugging Face cache does not hold, "):  # fmt: skip
        locate_base(ModelConfig(pretrained=str(single_file), single_file_config="someone/configs"))
    fake_hub_cache(offline, "someone/configs", configs_alone(tmp_path / "configs", tmp_path / "fetched"))
    assert locate_base(ModelConfig(pretrained=str(single_file), single_file_config="someone/configs")).folder is None

    # Online, diffusers downloads the configs as the base loads: SD1.5's, not in this cache, are not asked for.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert locate_base(ModelConfig(pretrained=str(single_file))).folder is None


def test_a_ckpt_whose_kind_is_not_read_before_loading_needs_either_kinds_configs(tmp_path, offline):
    """torch's legacy format keeps no pickle apart from the weights: its tensors are not read before it loads."""
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, ckpt, _use_new_zipfile_serialization=False)
    with pytest.raises(FinetuneError, match=rf"^base model file {ckpt} is read with hub model {SD1_CONFIGS} or {SD2_CONFIGS}'s configs "
                                            r"\(diffusers' pick for a .ckpt of SD1.x or SD2.x\), neither of which the local Hugging Face cache holds whole"):  # fmt: skip
        locate_base(ModelConfig(pretrained=str(ckpt)))
    sd15_shaped_pipeline(tmp_path).save_pretrained(tmp_path / "configs")
    fake_hub_cache(offline, SD2_CONFIGS, configs_alone(tmp_path / "configs", tmp_path / "fetched"))
    assert locate_base(ModelConfig(pretrained=str(ckpt))).folder is None


def test_a_ckpt_needs_the_configs_of_the_kind_its_tensors_say(tmp_path, offline):
    """A .ckpt's kind from its pickle's shapes (finetune.models.single_file_shapes), nothing of it unpickled but dicts and
    shapes: an SD2.x file with SD1.5's configs alone in the cache passed as either kind's, and failed offline as it loaded."""
    from finetune.models.single_file_configs import CROSS_ATTENTION_KEY, INPUT_CONV_KEY

    ckpt = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": {CROSS_ATTENTION_KEY: torch.zeros(320, 1024), INPUT_CONV_KEY: torch.zeros(320, 4, 3, 3)}, "global_step": 1}, ckpt)
    sd15_shaped_pipeline(tmp_path).save_pretrained(tmp_path / "configs")
    fake_hub_cache(offline, SD1_CONFIGS, configs_alone(tmp_path / "configs", tmp_path / "fetched"))
    with pytest.raises(FinetuneError, match=rf"^base model file {ckpt} is read with hub model {SD2_CONFIGS}'s configs \(diffusers' pick for its "
                                            r"kind\), which the local Hugging Face cache does not hold"):  # fmt: skip
        locate_base(ModelConfig(pretrained=str(ckpt)))
    assert hub_configs_for(ckpt) == (SD2_CONFIGS,)


@pytest.mark.parametrize("cross_attention, input_channels", [(768, 4), (1024, 4), (768, 9), (1024, 9)])
def test_the_hub_model_picked_for_a_file_is_diffusers_pick(tmp_path, cross_attention, input_channels):
    """`hub_configs_for` reads the header alone, without diffusers: it must name the model diffusers' loader fetches."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    from finetune.models.single_file_configs import CROSS_ATTENTION_KEY, INPUT_CONV_KEY

    state = {CROSS_ATTENTION_KEY: torch.zeros(320, cross_attention), INPUT_CONV_KEY: torch.zeros(320, input_channels, 3, 3)}
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")  # (a .ckpt's from its pickle's shapes)
    for name in ("model.safetensors", "model.ckpt"):
        assert hub_configs_for(tmp_path / name) == (fetch_diffusers_config(state)["pretrained_model_name_or_path"],), name


def test_an_inpainting_file_is_said_to_be_one_from_its_header(tmp_path, offline):
    """A 9-channel UNet's file (an inpainting model) was sent looking for the inpainting model's configs offline, and online
    loaded with them, where a folder of that kind is refused from its configs (check_architecture): its header says it."""
    from finetune.models.single_file_configs import CROSS_ATTENTION_KEY, INPUT_CONV_KEY

    for width in (768, 1024):  # SD1.x's, SD2.x's
        state = {INPUT_CONV_KEY: torch.zeros(8, 9, 3, 3), CROSS_ATTENTION_KEY: torch.zeros(8, width)}
        save_file(state, str(tmp_path / "inpainting.safetensors"))
        torch.save({"state_dict": state}, tmp_path / "inpainting.ckpt")  # a .ckpt's from its pickle's shapes
        for name in ("inpainting.safetensors", "inpainting.ckpt"):
            with pytest.raises(FinetuneError) as refused:
                locate_base(ModelConfig(pretrained=str(tmp_path / name)))
            assert str(refused.value) == (f"base model {tmp_path / name} has a UNet of 9 input channels (an inpainting model), not a "
                                          "text-to-image one of 4: set the base to the model it was made from")  # fmt: skip
