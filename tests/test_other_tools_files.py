"""Files other tools write, read as they are meant (or refused in one line naming the file and what it is)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.demo.adapter_scan import scan_adapters
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
PLAIN = {f"{Q}.lora_down.weight": torch.zeros(4, 32), f"{Q}.lora_up.weight": torch.zeros(32, 4), f"{Q}.alpha": torch.tensor(4.0)}
TE2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
UNET_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora"
TE1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
REFUSED = {
    "loha": ({f"{Q}.hada_w1_a": torch.zeros(32, 4), f"{Q}.hada_w1_b": torch.zeros(4, 32), f"{Q}.alpha": torch.tensor(4.0)}, " is a LyCORIS LoHa"),
    "lokr": ({f"{Q}.lokr_w1": torch.zeros(4, 4), f"{Q}.lokr_w2": torch.zeros(8, 8), f"{Q}.alpha": torch.tensor(4.0)}, " is a LyCORIS LoHa, LoKr"),
    # LyCORIS' DoRA per input channel (no wd_on_output), not peft's decomposition: told by the first dimension, as ComfyUI does
    "dora-per-input": ({**PLAIN, f"{Q}.dora_scale": torch.ones(1, 32)}, f": LoRA key {Q}.dora_scale ((1, 32)) is not one DoRA magnitude per output channel (32)"),
    # diffusers' SDXL layout: its second text encoder (this was a KeyError traceback in sample, export and merge)
    "sdxl-diffusers": ({f"{UNET_Q}.down.weight": torch.zeros(4, 640), f"{UNET_Q}.up.weight": torch.zeros(640, 4),
                        f"{TE2}.down.weight": torch.zeros(4, 1280), f"{TE2}.up.weight": torch.zeros(1280, 4)}, " is an SDXL LoRA"),
    # kohya's SDXL text encoders alone (this was "holds no SD1.x LoRA weights", and missing from the demo's list)
    "sdxl-te": ({f"{TE1}.lora_down.weight": torch.zeros(4, 768), f"{TE1}.lora_up.weight": torch.zeros(768, 4)}, " is an SDXL LoRA"),
    # SDXL's UNet by the original layout's blocks without its text encoders: told by its transformers' depth (SD1.x's
    # original-layout names load: tests/test_walkthrough_lora_files.py)
    "input-blocks": ({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
                      "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(640, 4)}, " is an SDXL LoRA"),
    "input-blocks-past-sd1": ({"lora_unet_input_blocks_12_0_in_layers_2.lora_down.weight": torch.zeros(4, 1280, 3, 3),
                               "lora_unet_input_blocks_12_0_in_layers_2.lora_up.weight": torch.zeros(1280, 4, 1, 1)},
                              ": LoRA key lora_unet_input_blocks_12_0_in_layers_2 names no layer of SD1.x's UNet in the original layout"),
    # a LoRA with an embedding bundled in (the webui's bundle_emb): the key is no LyCORIS one
    "bundled": ({**PLAIN, "bundle_emb.sks.string_to_param.*": torch.zeros(2, 64)}, ": LoRA key bundle_emb.sks.string_to_param.* is not a LoRA down/up weight"),
}  # fmt: skip


@pytest.mark.parametrize("name", REFUSED)
def test_a_file_of_a_kind_not_loaded_is_refused_naming_the_file_and_its_kind(name, tmp_path):
    tensors, said = REFUSED[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FinetuneError) as err:
        load_lora(path)
    assert str(err.value).startswith(f"LoRA {path}{said}")
    assert "LyCORIS" not in str(err.value) or name in ("loha", "lokr", "dora-per-input")


def test_the_demo_lists_sdxl_files_of_either_layout_as_refused(tmp_path):
    for name in ("sdxl-diffusers", "sdxl-te"):
        save_file(REFUSED[name][0], str(tmp_path / f"{name}.safetensors"))
    adapters = scan_adapters(tmp_path)
    assert sorted(adapters) == ["sdxl-diffusers", "sdxl-te"]
    assert all(adapter.refused.startswith("an SDXL LoRA") for adapter in adapters.values())


def attention_processor_lora(unet, text_encoder) -> dict[str, torch.Tensor]:
    """A LoRA as diffusers' train_dreambooth_lora.py saved it in 2023: named after the attention processors."""
    torch.manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for short, linear in (("q", module.to_q), ("k", module.to_k), ("v", module.to_v), ("out", module.to_out[0])):
                tensors[f"unet.{name}.processor.to_{short}_lora.down.weight"] = torch.randn(4, linear.in_features) * 0.3
                tensors[f"unet.{name}.processor.to_{short}_lora.up.weight"] = torch.randn(linear.out_features, 4) * 0.3
    for name, module in text_encoder.named_modules():
        if name.endswith("self_attn"):
            for short in ("q", "k", "v", "out"):
                linear = getattr(module, f"{short}_proj")
                tensors[f"text_encoder.text_model.{name}.to_{short}_lora.down.weight"] = torch.randn(4, linear.in_features) * 0.3
                tensors[f"text_encoder.text_model.{name}.to_{short}_lora.up.weight"] = torch.randn(linear.out_features, 4) * 0.3
    return tensors


def test_an_attention_processor_lora_of_diffusers_loads_as_diffusers_loads_it(tmp_path):
    """It was refused ('not a plain LoRA down/up weight'), though diffusers' load_lora_weights loads it."""
    from conftest import SHIPPED_BASE
    from diffusers import StableDiffusionPipeline

    from finetune.sampling.inference import load_sampling_pipeline

    base = load_sampling_pipeline(str(SHIPPED_BASE))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(attention_processor_lora(base.unet, base.text_encoder), str(path))
    lora = load_lora(path)
    assert len(lora.layers) == len([key for key in load_file(path) if key.endswith("down.weight")])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in lora.layers
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in lora.layers

    ours = load_sampling_pipeline(str(SHIPPED_BASE), str(path))
    theirs = StableDiffusionPipeline.from_pretrained(SHIPPED_BASE, safety_checker=None)
    theirs.load_lora_weights(str(path))
    ids = theirs.tokenizer(["a red star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = [
            (encoded := pipeline.text_encoder(ids)[0], pipeline.unet(latents, 500, encoder_hidden_states=encoded).sample)
            for pipeline in (ours, theirs, base)
        ]
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-5) and torch.allclose(outputs[0][1], outputs[1][1], atol=1e-5)
    assert not torch.allclose(outputs[0][1], outputs[2][1], atol=1e-2)  # and the LoRA changes what the UNet predicts


def test_a_controlnet_given_as_one_file_is_said_to_be_one_not_missing(make_recipe, pairs_folder, tmp_path, capsys):
    """`--controlnet FILE` and `controlnet.pretrained: FILE` said '... not found' of a file that is there."""
    from conftest import REPO

    from finetune.cli.main import main
    from finetune.methods.controlnet import ControlNetMethod

    original = tmp_path / "control_sd15_canny.safetensors"
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, str(original))
    inside = REPO / "finetune" / "assets" / "toyworld-controlnet-mask" / "diffusion_pytorch_model.safetensors"
    condition = REPO / "datasets" / "star" / "0000.png"
    for given, said in ((original, "is a single-file ControlNet in the original layout (control_model. keys"),
                        (inside, f"is a file of the model folder {inside.parent}: pass that folder")):  # fmt: skip
        assert main(["sample", "--base", "unused", "--controlnet", str(given), "--condition", str(condition), "--prompt", "x"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"ControlNet {given} {said}" in err[0]
    method = ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(original)))
    with pytest.raises(FinetuneError, match=r"controlnet.pretrained \S+control_sd15_canny.safetensors is a single-file ControlNet in the original layout"):
        method.check_data()


def test_the_demo_lists_a_single_file_controlnet_as_refused_with_what_to_do(tmp_path):
    """It was left out of the list without a word, so a user who put it there could not tell why."""
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, str(tmp_path / "control_canny.safetensors"))
    [(name, adapter)] = scan_adapters(tmp_path).items()
    assert (name, adapter.kind) == ("control_canny", "controlnet")
    assert adapter.refused.startswith("a single-file ControlNet in the original layout: convert it to a diffusers folder")


def test_a_single_file_base_of_one_part_only_is_one_line(tmp_path, capfd):
    """A UNet-only file (or a ControlNet's, or a VAE's) given as the base was diffusers' SingleFileComponentError traceback."""
    from test_single_file import sd15_shaped_pipeline

    from finetune.cli.main import main
    from finetune.formats.single_file_export import UNET_ROOT, export_checkpoint

    sd15_shaped_pipeline(tmp_path).save_pretrained(tmp_path / "configs")
    whole = export_checkpoint(tmp_path / "configs", tmp_path / "model.safetensors")[0]
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({key: value for key, value in load_file(whole).items() if key.startswith(UNET_ROOT)}, str(unet_only))
    capfd.readouterr()
    assert main(["sample", "--base", str(unet_only), "--base-config", str(tmp_path / "configs"), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip() and not line.startswith("Loading")]
    assert len(err) == 1 and err[0].startswith(f"error: base model file {unet_only} is not a whole Stable Diffusion checkpoint (diffusers: Failed to load"), err


@pytest.mark.parametrize("context_width, v2", [(1024, "True"), (768, "False")])
def test_a_kohya_export_says_whether_it_is_an_sd2_lora_as_the_webui_reads_it(context_width, v2):
    """The webui shows a LoRA with the models of its version, told by ss_v2 (it read every export as SD1's)."""
    from finetune.formats.kohya import LoRA, LoRALayer, to_kohya

    to_k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    lora = LoRA({to_k: LoRALayer(torch.zeros(4, context_width), torch.zeros(320, 4), 4.0)})
    _, metadata = to_kohya(lora)
    assert metadata["ss_v2"] == v2
    assert metadata["ss_base_model_version"] == ("sd_v2" if v2 == "True" else "sd_v1")


def test_check_data_says_training_would_stop_on_a_lora_init_from_it_cannot_start_from(tmp_path, capsys):
    """It said 'ready to train' of a LoHa or pickle lora.init_from; training then stopped at once."""
    from conftest import REPO, SHIPPED_BASE

    from finetune.cli.main import main

    loha = tmp_path / "loha.safetensors"
    save_file(REFUSED["loha"][0], str(loha))
    recipe = [str(REPO / "recipes" / "quickstart.yaml"), f"data.image_dir={REPO / 'datasets' / 'star'}", f"model.pretrained={SHIPPED_BASE}"]
    assert main(["check-data", *recipe]) == 0
    capsys.readouterr()
    assert main(["check-data", *recipe, f"lora.init_from={loha}"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"result: training would stop: LoRA {loha} is a LyCORIS LoHa")


def test_a_controlnet_folder_holding_only_its_fp16_variant_loads_in_sample_the_demo_and_training(make_recipe, pairs_folder, tmp_path):
    """sample said 'no file named diffusion_pytorch_model.bin' and the demo 'pickle checkpoints are not loaded'."""
    import shutil

    from conftest import REPO, SHIPPED_BASE

    from finetune.config import ModelConfig
    from finetune.demo.engine import _load_controlnet
    from finetune.methods.controlnet import ControlNetMethod
    from finetune.models.loading import load_base_model
    from finetune.sampling.inference import load_controlnet

    shipped = REPO / "finetune" / "assets" / "toyworld-controlnet-mask"
    folder = tmp_path / "controlnet-fp16"
    folder.mkdir()
    shutil.copy(shipped / "config.json", folder)
    weights = load_file(shipped / "diffusion_pytorch_model.safetensors")
    save_file({key: value.half() for key, value in weights.items()}, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    base = load_base_model(ModelConfig(pretrained=str(SHIPPED_BASE)))
    method = ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(folder)))
    method.check_data()
    method.base = base  # as setup sets it: the start line names the base's prediction type
    for controlnet in (load_controlnet(folder, base), _load_controlnet(folder)[0], method._load_or_create(base.unet)):
        loaded = controlnet.state_dict()
        assert all(torch.equal(loaded[key], value.half().float()) for key, value in weights.items())
    [adapter] = scan_adapters(tmp_path).values()
    assert adapter.kind == "controlnet" and adapter.refused is None


def test_a_base_folder_saved_with_only_a_variants_weights_loads(tmp_path):
    """save_pretrained(variant="fp16") writes no plain weight files: --base of it was diffusers' OSError traceback."""
    from conftest import SHIPPED_BASE
    from diffusers import StableDiffusionPipeline

    from finetune.config import ModelConfig
    from finetune.models.loading import load_base_model

    shipped = StableDiffusionPipeline.from_pretrained(SHIPPED_BASE, safety_checker=None)
    shipped.save_pretrained(tmp_path / "base", variant="fp16")
    assert not list((tmp_path / "base" / "unet").glob("diffusion_pytorch_model.safetensors"))
    base = load_base_model(ModelConfig.from_option(str(tmp_path / "base")))
    for part in ("unet", "vae", "text_encoder"):
        loaded = getattr(base, part).state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in getattr(shipped, part).state_dict().items()), part
