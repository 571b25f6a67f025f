"""lora.target_modules naming no layer of the UNet was said only when the LoRA was made, after the model had loaded and
`finetune train`'s data check had decoded every image: now from the UNet weights' header, before both, in the line the
LoRA's own check says (which every target it names, and some that would do)."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from finetune.errors import FinetuneError
from finetune.methods.lora import check_targets
from finetune.models.model_source import BaseLocation, locate_base
from finetune.models.unet_layer_names import (EXAMPLE_TARGETS, ORIGINAL_UNET, check_unet_targets_first, diffusers_names, matches, module_names, norm_kind,
                                              unet_weight_dims, weight_dims, weightless_modules)
from test_fast_errors import BASE, said_without_the_training_stack
from test_other_tools_lora_keys import EVERY_UNET_LAYER

RECIPES = Path(__file__).parent.parent / "recipes"

WRONG = ["to_qq", "to_k", "conv3"]


def test_train_says_targets_naming_no_unet_layer_before_its_data_check_and_torch(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")  # what the data check would refuse, had it come first
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    recipe = ["train", "recipes/quickstart.yaml", f"data.image_dir={tmp_path}", f"output_dir={tmp_path / 'run'}", f"model.pretrained={BASE}"]
    said = said_without_the_training_stack([[*recipe, f"lora.target_modules=[{', '.join(WRONG)}]"],
                                            [*recipe, "method=dreambooth", "dreambooth.adapter=lora", "dreambooth.prior_preservation=false",
                                             f"dreambooth.concepts=[{{instance_dir: {tmp_path}, instance_prompt: a sks star}}]",
                                             "data.image_dir=null", "lora.target_modules=[to_qq]"],
                                            [*recipe, "lora.target_modules=[to_q, to_out.1]"]])  # fmt: skip
    assert said[0].startswith("lora.target_modules: 'to_qq', 'conv3' name no layer of the UNet2DConditionModel (it has e.g. to_q, ")
    assert said[0].endswith("): fix or remove them")
    assert said[1].startswith("lora.target_modules: 'to_qq' names no layer of the UNet2DConditionModel")
    assert said[2].startswith("lora.target_modules: 'to_out.1' names Dropout layers of the UNet2DConditionModel, which have no weights")


def test_the_header_check_says_what_the_loaded_unets_check_says():
    from finetune.models.loading import load_base_model

    location = locate_base(_model(BASE))
    with pytest.raises(FinetuneError) as early:
        check_unet_targets_first(WRONG, location)
    unet = load_base_model(_model(BASE)).unet
    with pytest.raises(FinetuneError) as loaded:
        check_targets(unet, WRONG)
    assert str(early.value) == str(loaded.value)
    # Names that match, the loaded model's way: leaf names, dotted suffixes, whole paths.
    named = [name for name, _ in unet.named_modules() if name.endswith("attn1.to_q")][0]
    for targets in ([target for target in EXAMPLE_TARGETS if any(name.endswith(target) for name, _ in unet.named_modules())],
                    ["attn1.to_q", named]):  # fmt: skip
        check_unet_targets_first(targets, location)  # no refusal


# Every target_modules the recipes and the tests train with (tests/test_other_tools_lora_keys.py's every kind of UNet layer).
ACCEPTED = sorted({*EVERY_UNET_LAYER, *(name for path in RECIPES.glob("*.yaml") for name in (yaml.safe_load(path.read_text()).get("lora") or {})
                                        .get("target_modules", []))})  # fmt: skip


@pytest.mark.parametrize("target, start", [
    ("norm1", "'norm1' names GroupNorm, LayerNorm layers of the UNet2DConditionModel, which LoRA does not adapt (it adapts Linear and Conv2d"),
    ("norm", "'norm' names GroupNorm layers of the UNet2DConditionModel, which LoRA does not adapt"),
    ("attn1", "'attn1' names blocks of the UNet2DConditionModel, not the layers in them LoRA adapts: name their layers instead, e.g. attn1.to_q, "),
    ("transformer_blocks", "'transformer_blocks' names blocks of the UNet2DConditionModel, not the layers in them LoRA adapts: name their layers "
                           "instead, e.g. to_q, "),
])  # fmt: skip
def test_targets_naming_norm_layers_or_blocks_are_said_before_the_model_loads(target, start):
    """A norm's weight is 1-D in the header, a block holds none of its own: both passed the header's check, and peft
    refused them once the model had loaded (after the data check). Said from the header now, as the loaded check says it;
    every name peft accepts (those the recipes and the tests train with) still passes."""
    from peft import LoraConfig, inject_adapter_in_model

    from finetune.models.loading import load_base_model

    location = locate_base(_model(BASE))
    unet = load_base_model(_model(BASE)).unet
    with pytest.raises(FinetuneError) as early:
        check_unet_targets_first(["to_q", target], location)
    with pytest.raises(FinetuneError) as loaded:
        check_targets(unet, ["to_q", target])
    assert str(early.value).startswith(f"lora.target_modules: {start}") and str(early.value) == str(loaded.value)
    with pytest.raises(ValueError, match="is not supported"):  # what peft itself says of it
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", target]), copy.deepcopy(unet))
    accepted = [name for name in ACCEPTED if any(module.endswith(name) for module, _ in unet.named_modules())]  # the tiny UNet's own
    assert {"to_q", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"} <= set(accepted)
    check_unet_targets_first(accepted, location)
    check_targets(unet, accepted)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=accepted), copy.deepcopy(unet))


def test_the_norm_kinds_by_name_are_the_loaded_unets():
    from finetune.models.loading import load_base_model

    unet = load_base_model(_model(BASE)).unet
    norms = {name: type(module).__name__ for name, module in unet.named_modules() if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    assert norms and {name: norm_kind(name) for name in norms} == norms
    assert set(norms) == {name for name, ndim in unet_weight_dims(locate_base(_model(BASE))).items() if ndim == 1}  # every 1-D weight a norm's


def test_targets_naming_layers_without_weights_are_said_as_that_before_the_model_loads():
    """A Dropout or an activation has no weights, so the header names none: such a target was said to name no layer. The
    header's check knows them by where diffusers puts them (WEIGHTLESS), and says what the loaded UNet's check says."""
    from finetune.models.loading import load_base_model

    location = locate_base(_model(BASE))
    unet = load_base_model(_model(BASE)).unet
    with_weights = {name for name, module in unet.named_modules() if next(module.parameters(), None) is not None}
    assert weightless_modules(module_names(unet_weight_dims(location))) == {
        name: type(module).__name__ for name, module in unet.named_modules() if name not in with_weights}  # the table, against diffusers
    for targets, start in ((["to_out.1"], "'to_out.1' names Dropout layers of the UNet2DConditionModel, which have no weights"),
                           (["to_q", "act", "nonlinearity", "ff.net.1"], "'act', 'nonlinearity', 'ff.net.1' name Dropout, SiLU layers of")):
        with pytest.raises(FinetuneError) as early:
            check_unet_targets_first(targets, location)
        with pytest.raises(FinetuneError) as loaded:
            check_targets(unet, targets)
        assert str(early.value) == str(loaded.value)
        assert str(early.value).startswith(f"lora.target_modules: {start}")
        assert "(it adapts Linear and Conv2d layers, e.g. to_q, to_k, to_v, to_out.0, " in str(early.value)
    with pytest.raises(FinetuneError, match=r"^lora.target_modules: 'to_qq' names no layer"):  # a name naming nothing is said first
        check_unet_targets_first(["to_out.1", "to_qq"], location)


def test_a_single_files_unet_names_are_read_under_diffusers_names(tmp_path):
    """A single .safetensors base names its UNet's weights by the original layout's blocks: renamed to diffusers' names,
    they are the weights of the UNet it loads as, each with its number of dimensions."""
    from finetune.formats.single_file_export import export_checkpoint
    from test_single_file import sd15_shaped_pipeline

    pipeline = sd15_shaped_pipeline(tmp_path)
    pipeline.save_pretrained(tmp_path / "configs")
    path, _ = export_checkpoint(tmp_path / "configs", tmp_path / "model.safetensors")
    expected = {name.removesuffix(".weight"): weight.dim() for name, weight in pipeline.unet.state_dict().items() if name.endswith(".weight")}
    assert diffusers_names(weight_dims(path, ORIGINAL_UNET)) == expected
    with pytest.raises(FinetuneError, match=r"^lora.target_modules: 'to_qq', 'conv3' name no layer of the UNet2DConditionModel"):
        check_unet_targets_first(WRONG, BaseLocation(_model(str(path)), None))
    check_unet_targets_first(["to_q", "conv1", "down_blocks.0.downsamplers.0.conv", "time_embedding.linear_1"], BaseLocation(_model(str(path)), None))


def test_a_base_without_a_weights_header_is_left_to_the_loaded_check(tmp_path):
    (tmp_path / "unet").mkdir()
    check_unet_targets_first(WRONG, BaseLocation(_model(str(tmp_path)), tmp_path))  # a hub base whose weights are not fetched: no safetensors
    check_unet_targets_first(WRONG, BaseLocation(_model(str(tmp_path / "model.ckpt")), None))  # a pickle file: no header


def _model(pretrained: str):
    from finetune.config import Recipe

    return Recipe.model_fields["model"].annotation(pretrained=pretrained)


def test_check_data_says_the_targets_train_refuses_before_its_data_check(tmp_path, capsys):
    """check-data said "ready to train" of a recipe whose lora.target_modules `finetune train` refuses before its own data
    check: it runs the same check now, a fatal problem in its report."""
    from finetune.cli.main import main
    from odd_images import captioned, noise

    for seed in range(4):  # a batch of the quickstart's 4
        captioned(tmp_path / "photos", f"dog{seed}.png", noise(64, 64, seed=seed))
    command = ["check-data", "recipes/quickstart.yaml", f"data.image_dir={tmp_path / 'photos'}", f"model.pretrained={BASE}"]
    assert main([*command, "lora.target_modules=[to_q, to_qq]"]) == 1
    out = capsys.readouterr().out
    assert "\nfatal: lora.target_modules: 'to_qq' names no layer of the UNet2DConditionModel (it has e.g. to_q, " in f"\n{out}"
    assert out.rstrip().endswith("result: training would stop: 1 fatal problem; fix it")
    assert main([*command, "lora.target_modules=[to_q, to_out.0]"]) == 0
    assert "fatal" not in capsys.readouterr().out


def test_a_text_encoder_target_typo_is_said_before_the_data_check_and_torch(tmp_path):
    """lora.text_encoder_target_modules needs no header check as lora.target_modules does: the recipe itself takes only
    TEXT_ENCODER_LAYERS (finetune.config.methods), so a typo is said as the recipe loads, by train (with method lora or
    DreamBooth's text-encoder LoRA) and check-data alike, before any image is read or torch imported."""
    (tmp_path / "broken.png").write_bytes(b"not a png")  # what the data check would refuse, had it come first
    recipe = ["recipes/quickstart.yaml", f"data.image_dir={tmp_path}", f"model.pretrained={BASE}"]
    dreambooth = ["method=dreambooth", "dreambooth.adapter=lora", "dreambooth.prior_preservation=false", "dreambooth.train_text_encoder=true",
                  f"dreambooth.concepts=[{{instance_dir: {tmp_path}, instance_prompt: a sks star}}]", "data.image_dir=null"]  # fmt: skip
    said = said_without_the_training_stack([["train", *recipe, f"output_dir={tmp_path / 'run'}", "lora.train_text_encoder=true",
                                             "lora.text_encoder_target_modules=[q_proj, q_projj]"],
                                            ["train", *recipe, f"output_dir={tmp_path / 'run'}", *dreambooth, "lora.text_encoder_target_modules=[to_q]"],
                                            ["check-data", *recipe, "lora.train_text_encoder=true", "lora.text_encoder_target_modules=[fc3]"]])  # fmt: skip
    for line, typo in zip(said, ("q_projj", "to_q", "fc3")):
        assert f"lora.text_encoder_target_modules: '{typo}' is no text-encoder layer a LoRA adapts; pick from q_proj, " in line


def test_every_text_encoder_target_the_recipe_takes_is_a_linear_layer_of_the_clip_text_model():
    """Why the recipe's list is enough: each name it takes matches Linear layers of CLIPTextModel (the one text encoder a
    base may have: finetune.models.base_folder), which the loaded check (`check_targets`) accepts."""
    from transformers import CLIPTextModel

    from finetune.config.methods import TEXT_ENCODER_LAYERS

    text_encoder = CLIPTextModel.from_pretrained(Path(BASE) / "text_encoder")
    check_targets(text_encoder, list(TEXT_ENCODER_LAYERS))
    for target in TEXT_ENCODER_LAYERS:
        assert {type(module) for name, module in text_encoder.named_modules() if matches(name, target)} == {torch.nn.Linear}, target


@pytest.mark.parametrize("target, said", [("q_projj", "names no layer of the CLIPTextModel"), ("activation_fn", "layers of the CLIPTextModel, which have no weights"),
                                          ("layer_norm1", "LayerNorm layers of the CLIPTextModel"), ("mlp", "names blocks of the CLIPTextModel")])  # fmt: skip
def test_the_loaded_check_of_the_text_encoders_targets_names_their_key(target, said):
    """The loaded check's lines named lora.target_modules, the UNet's key, whichever model they checked: the text encoder's
    targets are lora.text_encoder_target_modules (its recipe check lets only CLIP's Linear layers through; a check of the
    loaded model speaks of the list it was given)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(Path(BASE) / "text_encoder")
    with pytest.raises(FinetuneError) as refused:
        check_targets(text_encoder, ["q_proj", target], "lora.text_encoder_target_modules")
    assert str(refused.value).startswith(f"lora.text_encoder_target_modules: '{target}' ") and said in str(refused.value), str(refused.value)


def test_a_lora_run_checks_its_text_encoders_targets_under_their_key(make_recipe, monkeypatch):
    """What the run's method passes: the UNet's targets as lora.target_modules, the text encoder's as their own key."""
    from finetune.methods.lora import LoRAMethod
    from finetune.models.loading import load_base_model

    recipe = make_recipe(lora__train_text_encoder=True)
    monkeypatch.setitem(recipe.lora.__dict__, "text_encoder_target_modules", ["q_proj", "mlp"])  # past the recipe's own check
    with pytest.raises(FinetuneError, match=r"^lora\.text_encoder_target_modules: 'mlp' names blocks of the CLIPTextModel"):
        LoRAMethod(recipe).setup(load_base_model(recipe.model))
